"""Block swap on the CPU (CPU→CPU, the hooks and order of the CUDA path): the same gradients, bit for bit, as no
swap, with and without gradient checkpointing, on a network whose block outputs are also used later (the UNet's
skip connections); a swapped weight is empty between its visits; the blocks come back exactly as they were.
And cpu_offload_checkpointing: the checkpointed inputs are held in a copy of their own."""
import pytest
import torch
from torch import nn

from trainer_core.memory.block_swap import BlockSwap, block_swap
from trainer_core.memory.checkpointing import gradient_checkpointing
from trainer_core.errors import KilnError


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("shift", torch.randn(width))

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))) + self.shift


class SkipNet(nn.Module):
    """Blocks in a row; each block's output also joins the end (as UNet input blocks feed its output blocks).
    The trainable part sits outside the blocks, as Kiln's adapters do: a LoRA-like delta on every fc1."""

    def __init__(self, n=6, width=8):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(n))
        for p in self.blocks.parameters():
            p.requires_grad_(False)
        self.down = nn.ParameterList(nn.Parameter(torch.randn(2, width) * 0.1) for _ in range(n))
        self.up = nn.ParameterList(nn.Parameter(torch.randn(2 * width, 2) * 0.1) for _ in range(n))
        for k, b in enumerate(self.blocks):
            base = b.fc1.forward
            b.fc1.forward = lambda x, base=base, k=k: base(x) + x @ self.down[k].t() @ self.up[k].t()

    def forward(self, x):
        skips = []
        for b in self.blocks:
            x = b(x)
            skips.append(x)
        return x + sum(s * (k + 1) for k, s in enumerate(skips))


def gradients(net, count=0, checkpoint=False):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with block_swap(list(net.blocks), count, torch.device("cpu")) as swap, \
            gradient_checkpointing(list(net.blocks), checkpoint):
        for p in net.down.parameters():
            p.grad = None
        for p in net.up.parameters():
            p.grad = None
        for _ in range(2):  # two steps: the second starts with the first one's leftovers resident
            (net(x) ** 2).mean().backward()
        with torch.no_grad():  # a no-grad pass between steps (probe, previews) too
            net(x)
        (net(x) ** 2).mean().backward()
    grads = [p.grad.clone() for p in [*net.down, *net.up]]
    return grads, swap


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("count", [1, 3, 6])
def test_swapped_blocks_give_bit_identical_gradients(count, checkpoint):
    torch.manual_seed(0)
    net = SkipNet()
    plain, _ = gradients(net, 0, checkpoint)
    swapped, swap = gradients(net, count, checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(plain, swapped))
    assert all(g.abs().sum() > 0 for g in plain)
    # every swapped block comes in for its forward and again for its backward, except that the first one stays
    # from a backward to the pass right after it: 3 steps and a no-grad pass (2N + 2N-1 + N-1 + 2N)
    assert swap.transfers == 7 * count - 2


def test_a_swapped_weight_is_empty_between_visits_and_everything_comes_back():
    torch.manual_seed(0)
    net = SkipNet()
    before = {n: (t, t.data_ptr(), t.clone()) for n, t in net.blocks.state_dict(keep_vars=True).items()}
    x = torch.randn(3, 8)
    swap = BlockSwap(list(net.blocks), 2, torch.device("cpu")).attach()
    try:
        assert net.blocks[5].fc1.weight.numel() == 0 and net.blocks[0].fc1.weight.numel() > 0
        out = net(x)
        assert net.blocks[4].fc2.weight.numel() == 0  # out again after its forward
        with pytest.raises(RuntimeError):
            net.blocks[5].fc2(torch.randn(1, 16))  # used out of turn: fails, never computes with stale values
        out.sum().backward()
    finally:
        swap.detach()
    now = net.blocks.state_dict(keep_vars=True)
    for n, (t, ptr, values) in before.items():
        assert now[n] is t and t.data_ptr() == ptr and torch.equal(t, values), n
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in net.blocks)


def test_the_count_must_fit_the_model():
    with pytest.raises(KilnError, match="blocks_to_swap=7: this model has 6 blocks"):
        BlockSwap(list(SkipNet().blocks), 7, torch.device("cpu"))


def test_cpu_offload_checkpointing_keeps_the_inputs_in_a_copy_of_their_own():
    """Without offload, a checkpointed block keeps its very input tensor, so its recompute reads a change made to
    that tensor after the forward; with offload, the input was copied to host memory and the recompute reads that."""
    torch.manual_seed(0)
    net = SkipNet(n=2)

    def step(offload):
        for p in net.parameters():
            p.grad = None
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
        with gradient_checkpointing([net.blocks[1]], True, offload):
            h = net.blocks[0](x)
            kept = h.detach().clone()
            y = net.blocks[1](h)
            h.data.add_(1.0)  # the input of block 1 changes after its forward
            y.sum().backward()
            h.data.copy_(kept)
        return [p.grad.clone() for p in [*net.down, *net.up]]

    for p in net.parameters():
        p.grad = None
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    net.blocks[1](net.blocks[0](x)).sum().backward()
    reference = [p.grad.clone() for p in [*net.down, *net.up]]
    assert all(torch.equal(a, b) for a, b in zip(step(True), reference))
    assert not all(torch.equal(a, b) for a, b in zip(step(False), reference))  # read the changed input


class InPlaceBlock(Block):
    """As ComfyUI's Flux blocks: the residual is added into the block's input in place (``x += ...``)."""

    def forward(self, x):
        x += self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x.clone()))))
        return x


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_blocks_that_add_into_their_inputs_give_the_same_gradients(offload):
    torch.manual_seed(0)
    blocks = [InPlaceBlock(8) for _ in range(3)]
    lora = nn.Parameter(torch.randn(8, 8) * 0.1)

    def grad(checkpoint):
        lora.grad = None
        with gradient_checkpointing(blocks, checkpoint, offload):
            x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3)) @ lora
            for b in blocks:
                x = b(x)
            (x ** 2).mean().backward()
        return lora.grad.clone()
    assert torch.equal(grad(True), grad(False))
