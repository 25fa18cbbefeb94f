"""Caption augmentation against kohya-ss/sd-scripts' process_caption semantics."""
import random
from collections import Counter

from trainer_core.data.captions import CaptionOptions, augment_caption, base_caption

TAGS = ["sks dog", "sitting", "grass", "blue sky", "sunlight", "photo"]
CAPTION = ", ".join(TAGS)


def draws(opts, n=50, seed=0, caption=CAPTION, epoch=1):
    rng = random.Random(seed)
    return [augment_caption(caption, opts, rng, epoch) for _ in range(n)]


def tags(caption):
    return [t.strip() for t in caption.split(",")]


def test_no_options_leave_the_caption_exactly_as_written():
    odd = "a  photo,of,  a dog ,"
    assert augment_caption(odd, CaptionOptions(), random.Random(0)) == odd
    assert not CaptionOptions().varies and CaptionOptions().describe() == ""


def test_shuffle_permutes_tags_and_keep_tokens_keeps_the_first_in_place():
    shuffled = draws(CaptionOptions(shuffle_caption=True))
    assert all(sorted(tags(c)) == sorted(TAGS) for c in shuffled)
    assert len(set(shuffled)) > 10
    assert Counter(tags(c)[0] for c in shuffled)["sks dog"] < 50  # without keep_tokens the first tag moves
    kept = draws(CaptionOptions(shuffle_caption=True, keep_tokens=1))
    assert all(tags(c)[0] == "sks dog" and sorted(tags(c)) == sorted(TAGS) for c in kept)
    assert len({tuple(tags(c)[1:]) for c in kept}) > 10
    two = draws(CaptionOptions(shuffle_caption=True, keep_tokens=2))
    assert all(tags(c)[:2] == ["sks dog", "sitting"] for c in two)


def test_keep_tokens_separator_fixes_the_head_and_the_part_after_a_second_separator():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")
    caption = "sks dog, red collar ||| grass, sky, tree, ball ||| best quality, photo"
    out = draws(opts, caption=caption)
    for c in out:
        t = tags(c)
        assert t[:2] == ["sks dog", "red collar"]  # the separator wins over keep_tokens (kohya)
        assert t[-2:] == ["best quality", "photo"]
        assert sorted(t[2:-2]) == ["ball", "grass", "sky", "tree"] and "|||" not in c
    assert len(set(out)) > 5
    # a caption without the separator falls back to keep_tokens
    assert all(tags(c)[:3] == TAGS[:3] for c in draws(opts))
    # Kiln removes the separator even with shuffling off (kohya would feed "|||" to the text encoder)
    plain = CaptionOptions(keep_tokens_separator="|||")
    assert augment_caption("a, b ||| c, d", plain, random.Random(0)) == "a, b, c, d"


def test_prefix_and_suffix_apply_without_other_augmentation_and_join_with_a_space():
    opts = CaptionOptions(caption_prefix="masterpiece,", caption_suffix=", by kiln")
    assert augment_caption("a dog, grass", opts, random.Random(0)) == "masterpiece, a dog, grass , by kiln"
    assert base_caption("a dog", CaptionOptions(caption_prefix="sks")) == "sks a dog"
    assert not opts.varies and "prefix 'masterpiece,'" in opts.describe()


def test_prefix_takes_part_in_shuffling_unless_kept_as_kohya_does():
    # kohya prepends the prefix before splitting: a prefix tag is shuffled like any other ...
    free = draws(CaptionOptions(shuffle_caption=True, caption_prefix="trigger,"), n=50)
    assert Counter(tags(c)[0] for c in free)["trigger"] < 50
    # ... and keep_tokens counts it, which is how users pin a trigger word
    pinned = draws(CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_prefix="trigger,"))
    assert all(tags(c)[0] == "trigger" and sorted(tags(c)[1:]) == sorted(TAGS) for c in pinned)
    # a prefix carrying the keep separator (a common kohya config) pins it the same way
    sep = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", caption_prefix="jay |||")
    assert all(tags(c)[0] == "jay" and sorted(tags(c)[1:]) == sorted(TAGS) for c in draws(sep))


def test_caption_dropout_rate_empties_whole_captions_prefix_included():
    assert set(draws(CaptionOptions(caption_dropout_rate=1.0, caption_prefix="p,"), n=20)) == {""}
    half = draws(CaptionOptions(caption_dropout_rate=0.5), n=2000)
    empty = half.count("")
    assert 900 < empty < 1100
    assert set(half) == {"", CAPTION}


def test_dropout_every_n_epochs_drops_exactly_on_those_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3, shuffle_caption=True)
    rng = random.Random(0)
    dropped = [e for e in range(1, 13) if all(augment_caption(CAPTION, opts, rng, e) == "" for _ in range(5))]
    kept = [e for e in range(1, 13) if all(augment_caption(CAPTION, opts, rng, e) != "" for _ in range(5))]
    assert dropped == [3, 6, 9, 12] and kept == [1, 2, 4, 5, 7, 8, 10, 11]


def test_tag_dropout_never_drops_kept_tags():
    opts = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=2)
    out = draws(opts, n=400)
    assert all(tags(c)[:2] == TAGS[:2] for c in out)
    assert all(set(tags(c)) <= set(TAGS) for c in out)
    counts = Counter(t for c in out for t in tags(c)[2:])
    assert all(120 < counts[t] < 280 for t in TAGS[2:]), counts  # each other tag survives about half the time
    everything = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens_separator="|||")
    caption = "sks dog ||| grass, sky ||| photo"
    assert set(draws(everything, caption=caption)) == {"sks dog, photo"}
    assert set(draws(CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1))) == {"sks dog"}


def test_secondary_separator_keeps_a_compound_tag_together():
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    out = draws(opts, caption="red;;;blue hair, smile, outdoors")
    assert all("red,blue hair" in c for c in out)


def test_same_seed_same_captions_other_seed_others():
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.2, caption_dropout_rate=0.1, keep_tokens=1)
    assert draws(opts, seed=5) == draws(opts, seed=5)
    assert draws(opts, seed=5) != draws(opts, seed=6)
    assert opts.varies


def test_base_caption_drops_randomness_but_keeps_prefix_and_separator_rules():
    opts = CaptionOptions(shuffle_caption=True, caption_dropout_rate=1.0, caption_prefix="sks,",
                          keep_tokens_separator="|||")
    assert base_caption("a ||| b, c", opts) == "sks, a, b, c"
