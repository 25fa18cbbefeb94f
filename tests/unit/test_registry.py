"""The option registry is the one declaration of every training option: the lists other modules derive from it
agree with it, and its declarations are consistent (defaults in range, kohya keys accepted, fields that exist)."""
import pytest

from trainer_core.kohya import config as kohya_config

from trainer_core.options import registry
from trainer_core.training import config as train_config
from trainer_core.training.loop import PRECISIONS, RESUMABLE_SETTINGS, TrainConfig
from trainer_core.options.training_args import KEYS, describe, parse_training_args

DEFAULTS = TrainConfig()


@pytest.mark.parametrize("option", registry.OPTIONS, ids=lambda o: f"{'widget' if o.widget else 'arg'}:{o.name}")
def test_declaration_is_consistent(option):
    o = option
    assert o.kind in ("int", "float", "bool", "choice", "str", "text", "steps", "kwargs")
    assert set(o.families) <= set(registry.FAMILIES) and o.families
    if o.config:  # its value lives in a field of its name in its TrainConfig group, with the same default
        holder = getattr(DEFAULTS, o.group) if o.group else DEFAULTS
        assert getattr(holder, o.name) == o.default, f"{o.name}: not in TrainConfig's {o.group or 'top level'}"
        assert DEFAULTS.get(o.name) == o.default
    for kind in registry.NODE_KINDS:
        v = o.for_node(kind)
        if v.choices and v.default is not None:
            assert v.default in v.choices
        if isinstance(v.default, (int, float)) and not isinstance(v.default, bool):
            assert (v.low is None or v.default >= v.low) and (v.high is None or v.default <= v.high), (o.name, kind)
    assert set(o.variants) <= set(registry.NODE_KINDS)


def test_train_config_takes_each_setting_by_its_flat_name_into_its_group():
    assert not set(train_config.GROUP_OF) & set(train_config.TOP_LEVEL)
    for name, group in train_config.GROUP_OF.items():
        cfg = TrainConfig(**{name: "given"})
        assert getattr(getattr(cfg, group), name) == "given" and cfg.get(name) == "given"
        assert getattr(TrainConfig(), group) is not getattr(cfg, group)
    with pytest.raises(TypeError, match="noise_ofset"):
        TrainConfig(noise_ofset=0.1)
    first = TrainConfig()
    first.group_lrs["te1"] = 1e-5
    assert TrainConfig().group_lrs == {}  # host settings' mutable defaults are not shared between configs


def test_training_args_keys_are_the_registry_s_and_each_parses_as_its_family_reads_it():
    assert KEYS == {o.name: o for o in registry.OPTIONS if not o.widget}
    for family in registry.FAMILIES:
        assert describe(family).splitlines() == [f"{k}: {o.help}" for k, o in registry.training_args(family).items()]
    for name, o in KEYS.items():
        family = o.families[0]
        if o.kind == "bool":
            assert parse_training_args(f"{name}=true", family, "t") == {name: True}
        elif o.kind == "choice":
            assert parse_training_args(f"{name}={o.choices[0]}", family, "t") == {name: o.choices[0]}


def test_every_train_node_layout_names_declared_widgets_once_and_has_training_args():
    for kind, layout in registry.LAYOUTS.items():
        assert len(set(layout)) == len(layout), kind
        assert all(name in registry.WIDGETS for name in layout), kind
        assert "training_args" in layout
        family = "sd1" if kind == "dreambooth" else kind
        assert all(family in registry.widget(n, kind).families or n.startswith("text_encoder_lr") for n in layout)
    assert set(registry.WIDGETS) == {n for layout in registry.LAYOUTS.values() for n in layout}


def test_kohya_config_reads_every_registry_kohya_key():
    known = set(kohya_config.TRAIN_KEYS) | set(kohya_config.SD3_KEYS) | set(kohya_config.FLUX_KEYS) \
        | set(kohya_config.TRAINING_ARGS)
    for o in registry.OPTIONS:
        assert set(o.kohya) <= known, o.name
    assert kohya_config.TRAIN_KEYS["max_train_steps"] == "steps"
    for family in ("sd3", "flux"):  # each flow family's own widgets, the ones they share in both
        assert set(kohya_config.FLOW_KEYS[family]) == {o.name for o in registry.OPTIONS if o.widget and family in
                                                       o.families and set(o.families) - {registry.ANY} <= {"sd3", "flux"}}


def test_resumable_settings_and_precisions_come_from_the_registry():
    assert set(registry.resumable()) <= set(RESUMABLE_SETTINGS)
    assert set(RESUMABLE_SETTINGS) - set(registry.resumable()) == {"group_lrs"}  # not an option: the te lrs
    assert registry.PRECISION_CHOICES == ("auto", *PRECISIONS)


def test_metadata_records_every_declared_key_with_its_value():
    cfg = TrainConfig(noise_offset=0.07, debiased_estimation_loss=True, steps=12, learning_rate=3e-4, max_token_length=150)
    meta = registry.metadata_of(cfg)
    assert meta["noise_offset"] == 0.07 and meta["debiased_estimation"] is True
    assert meta["max_train_steps"] == 12 and meta["learning_rate"] == meta["unet_lr"] == 3e-4
    assert meta["max_token_length"] == 150
    declared = {k for o in registry.OPTIONS if o.config for k in o.metadata}
    assert set(meta) == declared


def test_widget_metadata_records_a_family_s_own_widgets():
    values = {"weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 1.0, "mode_scale": 1.29,
              "apply_lg_attn_mask": True, "apply_t5_attn_mask": False, "training_shift": 3.0}
    assert registry.widget_metadata(values, "sd3") == {k: v for k, v in values.items() if k != "training_shift"}
    assert registry.widget_metadata(values, "sd1") == {}
