import pytest
import torch
from torch import Tensor, nn

from lightning_mmbalance.fusion import ConcatFusion, FusionOutput, SumFusion, ZeroMaskFusion

WIDTHS = {"a": 3, "b": 5, "c": 2}


def features(dtype: torch.dtype = torch.float32, batch: int = 4, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, generator=g, dtype=dtype) for m, d in WIDTHS.items()}


class LinearOnConcat(nn.Module):
    """A user head: one Linear over the concatenation, called with a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(sum(WIDTHS.values()), 4)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        return self.fc(torch.cat([feats[m] for m in WIDTHS], dim=1))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_concat_split_unimodal_logits_sum_to_fused(dtype: torch.dtype, atol: float) -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion(WIDTHS, num_classes=4).to(dtype)
    feats = features(dtype)
    out = fusion(feats)
    assert isinstance(out, FusionOutput)
    assert out.logits.shape == (4, 4)
    assert list(out.unimodal_logits) == ["a", "b", "c"]
    assert all(z.shape == (4, 4) and z.dtype == dtype for z in out.unimodal_logits.values())
    torch.testing.assert_close(sum(out.unimodal_logits.values()), out.logits, atol=atol, rtol=0)
    torch.testing.assert_close(out.logits, fusion.fc(torch.cat(list(feats.values()), 1)), atol=0, rtol=0)
    # the weight slices: z_a = f_a @ W[:, :3].T + b / 3
    expected_a = feats["a"] @ fusion.fc.weight[:, :3].T + fusion.fc.bias / 3
    torch.testing.assert_close(out.unimodal_logits["a"], expected_a, atol=atol, rtol=0)


def test_concat_whole_bias_is_head_on_zero_padded_concatenation() -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion(WIDTHS, num_classes=4, bias="whole").double()
    feats = features(torch.float64)
    out = fusion(feats)
    for m in WIDTHS:
        padded = torch.cat([f if k == m else torch.zeros_like(f) for k, f in feats.items()], dim=1)
        torch.testing.assert_close(out.unimodal_logits[m], fusion.fc(padded), atol=1e-12, rtol=0)
    torch.testing.assert_close(sum(out.unimodal_logits.values()), out.logits + 2 * fusion.fc.bias, atol=1e-12, rtol=0)


def test_concat_uses_in_features_order_not_mapping_order() -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion(WIDTHS, num_classes=4).double()
    feats = features(torch.float64)
    reordered = {m: feats[m] for m in ["c", "a", "b"]}
    out, out_reordered = fusion(feats), fusion(reordered)
    assert list(out_reordered.unimodal_logits) == ["a", "b", "c"]
    torch.testing.assert_close(out_reordered.logits, out.logits, atol=0, rtol=0)


def test_sum_fusion_sums_branches_with_full_bias() -> None:
    torch.manual_seed(0)
    fusion = SumFusion(WIDTHS, num_classes=4).double()
    feats = features(torch.float64)
    out = fusion(feats)
    assert set(fusion.fcs) == set(WIDTHS)
    for m, f in feats.items():
        torch.testing.assert_close(out.unimodal_logits[m], fusion.fcs[m](f), atol=0, rtol=0)
    torch.testing.assert_close(out.logits, sum(fusion.fcs[m](f) for m, f in feats.items()), atol=1e-12, rtol=0)


def test_zero_mask_fusion_equals_head_on_zeroed_features() -> None:
    torch.manual_seed(0)
    head = LinearOnConcat().double()
    fusion = ZeroMaskFusion(head, ["a", "b", "c"])
    feats = features(torch.float64)
    out = fusion(feats)
    torch.testing.assert_close(out.logits, head(feats), atol=0, rtol=0)
    for m in WIDTHS:
        zeroed = {k: f if k == m else torch.zeros_like(f) for k, f in feats.items()}
        torch.testing.assert_close(out.unimodal_logits[m], head(zeroed), atol=0, rtol=0)
    # for a linear head it equals ConcatFusion with the whole bias
    concat = ConcatFusion(WIDTHS, num_classes=4, bias="whole").double()
    concat.fc.load_state_dict(head.fc.state_dict())
    expected = concat(feats)
    for m in WIDTHS:
        torch.testing.assert_close(out.unimodal_logits[m], expected.unimodal_logits[m], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConcatFusion(WIDTHS, 4),
        lambda: ConcatFusion(WIDTHS, 4, bias="whole"),
        lambda: SumFusion(WIDTHS, 4),
        lambda: ZeroMaskFusion(LinearOnConcat(), list(WIDTHS)),
    ],
)
def test_gradient_reaches_every_encoder_through_unimodal_logits(make) -> None:
    torch.manual_seed(0)
    fusion = make()
    encoders = nn.ModuleDict({m: nn.Linear(6, d) for m, d in WIDTHS.items()})
    x = torch.randn(4, 6)
    out = fusion({m: enc(x) for m, enc in encoders.items()})
    for m, enc in encoders.items():
        (grad,) = torch.autograd.grad(out.unimodal_logits[m].square().sum(), enc.weight, retain_graph=True)
        assert grad.abs().sum() > 0
        others = [e.weight for k, e in encoders.items() if k != m]
        grads = torch.autograd.grad(out.unimodal_logits[m].sum(), others, retain_graph=True, allow_unused=True)
        assert all(g is None for g in grads)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"`bias` must be one of \('split', 'whole'\), got 'half'"):
        ConcatFusion(WIDTHS, 4, bias="half")
    with pytest.raises(ValueError, match="`in_features` must be a non-empty mapping"):
        ConcatFusion({}, 4)
    with pytest.raises(ValueError, match=r"`in_features\['b'\]` must be an int >= 1, got 0"):
        SumFusion({"a": 3, "b": 0}, 4)
    with pytest.raises(ValueError, match="Modality names in `in_features` must be strings, got 1"):
        ConcatFusion({1: 3}, 4)
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1, got 0"):
        SumFusion(WIDTHS, 0)
    with pytest.raises(TypeError, match="`head` must be an nn.Module"):
        ZeroMaskFusion(lambda feats: feats["a"], ["a"])
    with pytest.raises(ValueError, match="`modalities` must be a non-empty sequence of distinct modality names"):
        ZeroMaskFusion(LinearOnConcat(), ["a", "a"])
    with pytest.raises(ValueError, match="`modalities` must be a non-empty sequence"):
        ZeroMaskFusion(LinearOnConcat(), "ab")


@pytest.mark.parametrize("make", [lambda: ConcatFusion(WIDTHS, 4), lambda: SumFusion(WIDTHS, 4)])
def test_feature_errors(make) -> None:
    fusion = make()
    name = type(fusion).__name__
    feats = features()
    with pytest.raises(ValueError, match=rf"{name} expects features for the modalities \['a', 'b', 'c'\], got \['a'"):
        fusion({"a": feats["a"], "b": feats["b"]})
    with pytest.raises(ValueError, match=r"`features\['b'\]` must have shape \(B, 5\) .* got \(4, 4\)"):
        fusion({**feats, "b": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"`features\['c'\]` must have shape \(B, 2\) .*\(4,\)\), got \(3, 2\)"):
        fusion({**feats, "c": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match=r"`features\['a'\]` must have shape \(B, 3\) .* got \(4, 3, 1\)"):
        fusion({**feats, "a": torch.zeros(4, 3, 1)})


def test_zero_mask_errors() -> None:
    fusion = ZeroMaskFusion(LinearOnConcat(), list(WIDTHS))
    with pytest.raises(ValueError, match=r"ZeroMaskFusion expects features for the modalities \['a', 'b', 'c'\]"):
        fusion({"a": torch.zeros(2, 3)})

    class TupleHead(nn.Module):
        def forward(self, feats: dict[str, Tensor]) -> tuple[Tensor]:
            return (feats["a"],)

    with pytest.raises(TypeError, match="must return a \\(B, C\\) tensor, got tuple"):
        ZeroMaskFusion(TupleHead(), ["a"])({"a": torch.zeros(2, 3)})
