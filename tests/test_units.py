"""Pure helpers: adapter id rules, sampling parameter validation and selection, the bank's slot table."""

from __future__ import annotations

import os

import pytest
import torch
from multiadapter.adapter_ids import adapter_directory, check_adapter_id, discover_adapter_ids
from multiadapter.bank import BASE_SLOT, AdapterBank
from multiadapter.errors import InvalidRequest, Unavailable
from multiadapter.layers import BankedLinear, lora_delta
from multiadapter.lora_loading import LoraAdapter, LoraModuleWeights
from multiadapter.sampling import SamplingLimits, SamplingParams, select_tokens
from torch import nn

GOOD_IDS = ["a", "upper", "rot13", "A.b_c-9", "x" * 128, ""]
BAD_IDS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a/b",
    "a\x00b",
    "x" * 129,
    ".hidden",
    "-dash",
    "ｕpper",
    "a b",
    "a..b",
    "\u0430dapter",
]


@pytest.mark.parametrize("adapter_id", GOOD_IDS)
def test_valid_ids(adapter_id):
    assert check_adapter_id(adapter_id) == adapter_id


@pytest.mark.parametrize("adapter_id", BAD_IDS)
def test_invalid_ids_are_refused(adapter_id):
    with pytest.raises(InvalidRequest, match="invalid adapter_id"):
        check_adapter_id(adapter_id)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "escape")
    (root / "fine").mkdir()
    assert adapter_directory(root, "fine") == (root / "fine").resolve()
    with pytest.raises(InvalidRequest, match="outside the adapter root"):
        adapter_directory(root, "escape")
    assert discover_adapter_ids(root) == ["escape", "fine"]


LIMITS = SamplingLimits(default_max_tokens=16, max_tokens_cap=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be between 1 and 64"),
        (dict(max_tokens=65), "max_tokens must be between 1 and 64"),
        (dict(temperature=-0.1), "temperature must be"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
    ],
)
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams.from_request(LIMITS, **kwargs)


def test_sampling_defaults():
    params = SamplingParams.from_request(LIMITS)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 0.0, 1.0, 0)
    assert params.greedy


def test_selection_greedy_topk_and_seeded_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [0.0, 5.0, 1.0, 4.9]])
    greedy = SamplingParams(max_tokens=1)
    top1 = SamplingParams(max_tokens=1, temperature=1.0, top_k=1)
    assert select_tokens(logits, [greedy, top1], [None, torch.Generator().manual_seed(0)]) == [1, 1]
    hot = SamplingParams(max_tokens=1, temperature=5.0, seed=3)
    draws = [select_tokens(logits[:1], [hot], [torch.Generator().manual_seed(3)])[0] for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    spread = {select_tokens(logits[:1], [hot], [torch.Generator().manual_seed(s)])[0] for s in range(40)}
    assert len(spread) > 1  # sampling really samples
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)
    picks = {select_tokens(logits[:1], [nucleus], [torch.Generator().manual_seed(s)])[0] for s in range(40)}
    assert picks <= {1, 3}


def test_lora_delta_semantics():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, generator=gen)
    a_t, b_t = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 4, 6, generator=gen)
    out = lora_delta(x, a_t, b_t)
    for i in range(3):
        torch.testing.assert_close(out[i], (x[i] @ a_t[i]) @ b_t[i])


def _adapter(adapter_id: str, rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = LoraModuleWeights(
        torch.randn(rank, 4, generator=gen), torch.randn(3, rank, generator=gen), rank, 1.0
    )
    return LoraAdapter(adapter_id, f"v{seed}", {"proj": weights})


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        return self.proj(x)


def test_bank_slots_fill_free_reuse_and_capacity():
    model = _Tiny()
    bank = AdapterBank(model, capacity=2)
    a = bank.add(_adapter("a", 2, 1))
    b = bank.add(_adapter("b", 5, 2))
    assert (a.slot, b.slot) == (0, 1) and isinstance(model.proj, BankedLinear)
    assert model.proj.max_rank == 5  # padded to the largest rank present
    assert bank.full
    with pytest.raises(Unavailable, match="full"):
        bank.add(_adapter("c", 1, 3))
    bank.remove(a.slot)
    with pytest.raises(KeyError):
        bank.remove(a.slot)
    c = bank.add(_adapter("c", 1, 3))
    assert c.slot == 0  # the freed slot is reused
    bank.remove(b.slot)
    b2 = bank.add(_adapter("b", 3, 4))  # a second version of an id is a new entry; the manager picks
    assert (b2.slot, b2.version) == (1, "v4")
    assert [e.adapter_id for e in bank.entries()] == ["c", "b"]


def test_bank_routes_each_row_to_its_adapter():
    model = _Tiny()
    bank = AdapterBank(model, capacity=4)
    adapters = [_adapter("a", 2, 1), _adapter("b", 5, 2)]
    slots = [bank.add(ad).slot for ad in adapters]
    x = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(9))
    rows = [slots[0], BASE_SLOT, slots[1], slots[0]]
    with torch.no_grad(), bank.routing(rows):
        out = model(x)
    base = model.proj.base
    with torch.no_grad():
        expected = [
            base(x[0]) + x[0] @ adapters[0].modules["proj"].a.T @ adapters[0].modules["proj"].b_scaled.T,
            base(x[1]),
            base(x[2]) + x[2] @ adapters[1].modules["proj"].a.T @ adapters[1].modules["proj"].b_scaled.T,
            base(x[3]) + x[3] @ adapters[0].modules["proj"].a.T @ adapters[0].modules["proj"].b_scaled.T,
        ]
    for i in range(4):
        torch.testing.assert_close(out[i], expected[i])
    assert model.proj.route is None  # routing is cleared after the block


@pytest.mark.parametrize("rows", [[2], [1, 2, 3], [0, 2], [3, 1], [0, 1, 2, 3, 4]])
def test_rows_read_and_write_like_index_ops_whether_consecutive_or_not(rows):
    from multiadapter.batch_rows import Rows

    selection = Rows.of(rows)
    assert (selection.span is not None) == (rows == list(range(rows[0], rows[0] + len(rows))))
    y = torch.randn(5, 3, 4)
    delta = torch.randn(len(rows), 3, 4)
    index = torch.tensor(rows)
    assert torch.equal(selection.take(y), y.index_select(0, index))
    assert torch.equal(selection.add_into(y.clone(), delta), y.index_add(0, index, delta))
    assert torch.equal(selection.copy_into(y.clone(), delta), y.index_copy(0, index, delta))
