"""The released code's options in the core, against expectations worked out by hand: the
selection rule on normalised weights, its schedules and modes, the sigmoid norm, the translation
of an official config, and LLaVA's mm_projector.bin as a pretrained connector."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from pmod_cli import PMoDConfig
from pmod_cli.errors import UserError
from pmod_cli.model.formats import official_pmod
from pmod_cli.model.router import WEIGHT_NORM_FNS
from pmod_cli.model.selection import SELECTION_RULES
from pmod_cli.training.build import load_connector

WHERE = Path("ckpt")


def tanh_weights(candidates, alpha=0.2):
    return lambda logits: 1.0 + WEIGHT_NORM_FNS["tanh"](logits, candidates, alpha, 0.0)


def select(rule, logits, vision, keep):
    logits = torch.tensor(logits)
    vision = torch.tensor(vision)
    return SELECTION_RULES[rule](logits, vision, torch.tensor(keep), tanh_weights(vision))


# ---- selection rules ------------------------------------------------------------------------------


def test_both_rules_keep_the_top_vision_tokens_when_nothing_ties():
    logits = [
        [5.0, 2.0, -1.0, 0.5, 3.0, 9.0]
    ]  # the text tokens (0, 5) score high: they do not compete
    vision = [[False, True, True, True, True, False]]
    expected = [[False, True, False, False, True, False]]  # 3.0 and 2.0
    for rule in ("score", "weight"):
        assert select(rule, logits, vision, [2]).tolist() == expected


def test_a_batch_keeps_each_samples_own_count():
    logits = [[0.1, 0.4, 0.3, 0.2], [0.9, 0.1, 0.5, 0.7]]
    vision = [[True, True, True, True], [False, True, True, True]]
    for rule in ("score", "weight"):
        kept = select(rule, logits, vision, [3, 1])
        assert kept.tolist() == [[False, True, True, True], [False, False, False, True]]


def test_the_weight_rule_ranks_saturated_weights_as_ties_in_bf16():
    # tanh saturates: r = 3 and r = 9 both weigh 1 + 0.2 = 1.203125 in bf16, so the raw scores no
    # longer decide; the score rule still prefers r = 9
    logits = torch.tensor([[3.0, 9.0, 0.0, -9.0]], dtype=torch.bfloat16)
    vision = torch.tensor([[True, True, True, True]])
    weights = tanh_weights(vision)(logits)
    assert weights.tolist() == [[1.203125, 1.203125, 1.0, 0.80078125]]
    score = SELECTION_RULES["score"](logits, vision, torch.tensor([1]), tanh_weights(vision))
    assert score.tolist() == [[False, True, False, False]]
    weight = SELECTION_RULES["weight"](logits, vision, torch.tensor([1]), tanh_weights(vision))
    expected = torch.topk(
        torch.tensor([[1.203125, 1.203125, 1.0, 0.80078125]], dtype=torch.bfloat16), 1
    ).indices
    assert weight.nonzero()[:, 1].tolist() == expected[0].tolist()
    assert int(expected[0, 0]) in (0, 1)
    # two slots: both saturated tokens, whichever way the tie breaks
    both = SELECTION_RULES["weight"](logits, vision, torch.tensor([2]), tanh_weights(vision))
    assert both.tolist() == [[True, True, False, False]]


def test_text_tokens_weigh_1_minus_alpha_and_can_take_slots():
    # every vision token saturated low weighs 0.8 like the text tokens (r = -inf before the norm):
    # torch.topk then chooses among six equal weights, and a text winner's slot is lost
    logits = torch.tensor([[0.0, -40.0, -40.0, -40.0, -40.0, 0.0]])
    vision = torch.tensor([[False, True, True, True, True, False]])
    hand = torch.tensor([[0.8] * 6])
    assert torch.allclose(tanh_weights(vision)(logits.masked_fill(~vision, float("-inf"))), hand)
    winners = set(torch.topk(hand, 2).indices[0].tolist())
    kept = SELECTION_RULES["weight"](logits, vision, torch.tensor([2]), tanh_weights(vision))
    assert set(kept.nonzero()[:, 1].tolist()) == winners - {0, 5}
    # the score rule keeps two vision tokens whatever their scores
    assert (
        SELECTION_RULES["score"](logits, vision, torch.tensor([2]), tanh_weights(vision)).sum() == 2
    )


def test_a_layer_runs_the_rule_its_config_names():
    from test_model_core import batch_inputs

    from pmod_cli import apply_pmod, record_routing

    model, processor = tiny_model(layers=4)
    inputs = batch_inputs(processor)  # two prompts, left-padded
    kept = {}
    for rule in ("score", "weight"):
        apply_pmod(model, PMoDConfig(ratios=[1.0, 0.5, 1.0, 1.0], selection=rule))
        with torch.no_grad():  # a fresh router with bias 50: every score is 50, every weight 1.2
            model.model.language_model.layers[1].router.bias.fill_(50.0)
        with torch.no_grad(), record_routing(model) as routing:
            model(**inputs)
        kept[rule] = routing.layers[1]
    vision = kept["score"].vision_mask  # (batch, seq)
    keep_count = torch.floor(vision.sum(dim=1) * 0.5).long()
    # the score rule: equal scores keep the earliest vision tokens
    order = vision.long().cumsum(dim=1)
    assert torch.equal(kept["score"].keep_mask & vision, vision & (order <= keep_count[:, None]))
    # the weight rule: torch.topk over 1.2 (vision) and 0.8 (every other position), first k_i slots
    hand = torch.where(vision, 1.2, 0.8)
    top = torch.topk(hand, int(keep_count.max()), dim=1).indices
    expected = torch.zeros_like(vision)
    for sample in range(2):
        expected[sample, top[sample, : keep_count[sample]]] = True
    assert torch.equal(kept["weight"].keep_mask & vision, expected & vision)
    assert torch.equal(
        kept["weight"].weights[vision], torch.full_like(kept["weight"].weights[vision], 1.2)
    )


# ---- schedules and modes ------------------------------------------------------------------------


def test_cosine31_is_the_layer_count_form_at_32_layers_only():
    at32 = PMoDConfig(schedule="cosine31").retention_ratios(32)
    assert at32 == pytest.approx(PMoDConfig(schedule="cosine").retention_ratios(32), abs=1e-12)
    assert at32[:8] == [1.0] * 8 and at32[8] < 0.85
    at40 = PMoDConfig(schedule="cosine31").retention_ratios(40)
    assert at40[31] == 0.15  # 0.5 cos(pi) + 0.5 = 0, clamped
    assert at40[39] == pytest.approx(
        0.5 - 0.5 * math.cos(8 * math.pi / 31)
    )  # turned back up: 0.160
    assert (
        PMoDConfig(schedule="cosine31").retention_ratios(8) == [1.0] * 8
    )  # a shallow model stays dense


def test_linear31():
    ratios = PMoDConfig(schedule="linear31", beta=0.4).retention_ratios(8)
    assert ratios[:2] == [1.0, 1.0]  # 0.9, 0.868 > 0.85
    assert ratios[2] == pytest.approx(0.9 - 2 / 31)
    assert ratios[7] == pytest.approx(0.9 - 7 / 31)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("interleave", [1.0, 0.3, 1.0, 0.3, 1.0, 0.3]),
        ("deep_all", [1.0, 1.0, 0.3, 0.3, 0.3, 1.0]),
        ("deep_all_include_last", [1.0, 1.0, 0.3, 0.3, 0.3, 0.3]),
    ],
)
def test_the_released_modes_use_beta_as_the_ratio(schedule, expected):
    assert PMoDConfig(schedule=schedule, beta=0.3).retention_ratios(6) == expected


def test_the_sigmoid_norm():
    logits = torch.tensor([[0.0, 2.0]])
    offset = WEIGHT_NORM_FNS["sigmoid"](logits, torch.ones(1, 2, dtype=torch.bool), 0.2, 0.0)
    assert offset[0].tolist() == pytest.approx([0.1, 0.2 / (1 + math.exp(-2.0))])


# ---- an official config in pmod's terms -------------------------------------------------------------

BASE = {"mod_target_token_type": "vision_all", "mod_weight_norm": "tanh_0.2_1"}


def test_the_released_settings_translate():
    config = official_pmod.pmod_config(
        {**BASE, "mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_router_factor": 0.5},
        "llava_next",
        WHERE,
    )
    assert (config.schedule, config.beta, config.max_ratio, config.min_ratio) == (
        "cosine31",
        0.5,
        0.85,
        0.15,
    )
    assert (config.weight_norm, config.alpha, config.selection, config.reweight, config.string) == (
        "tanh",
        0.2,
        "weight",
        "mlp",
        True,
    )
    linear = official_pmod.pmod_config(
        {**BASE, "mod_target_layers": "shiftedlinear_decay_0.8_0.2", "mod_router_factor": 0.4},
        "llava",
        WHERE,
    )
    assert (linear.schedule, linear.max_ratio, linear.min_ratio) == ("linear31", 0.8, 0.2)
    # a fixed ratio outside the default thresholds is still the ratio
    deep = official_pmod.pmod_config(
        {**BASE, "mod_target_layers": "deep_all", "mod_router_factor": 0.1}, "llava", WHERE
    )
    assert deep.retention_ratios(5) == [1.0, 1.0, 0.1, 0.1, 1.0]


@pytest.mark.parametrize(
    "norm, expected",
    [
        ("tanh_0.2_1", ("tanh", 0.2, None)),
        ("tanh_0.1_1", ("tanh", 0.1, None)),
        ("sigmoid", ("sigmoid", 1.0, None)),
        ("softmax_0.2_1", ("softmax", 0.2, None)),
        ("softmax_0.2_0.9", ("shifted_softmax", 0.2, pytest.approx(-0.1))),
        ("none", ("none", 0.2, None)),
    ],
)
def test_weight_norms_translate(norm, expected):
    assert official_pmod._weight_norm(norm, WHERE) == expected


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"mod_target_layers": "every_other", "mod_router_factor": 0.5},
            "unknown mod_target_layers 'every_other'",
        ),
        ({"mod_target_layers": "deep_all", "mod_router_factor": 1.0}, "between 0 and 1"),
        ({"mod_target_layers": "deep_all", "mod_router_factor": "half"}, "expected a number"),
        (
            {
                "mod_target_layers": "deep_all",
                "mod_router_factor": 0.5,
                "mod_weight_norm": "tanh_0.2_0.5",
            },
            "no pmod equivalent",
        ),
        (
            {
                "mod_target_layers": "deep_all",
                "mod_router_factor": 0.5,
                "mod_target_token_type": "all",
            },
            "not supported",
        ),
        (
            {
                "mod_target_layers": "deep_all",
                "mod_router_factor": 0.5,
                "mod_target_token_type": "vision_hr",
            },
            "high-resolution",
        ),
    ],
)
def test_what_pmod_cannot_compute_is_refused(values, message):
    with pytest.raises(UserError, match=message):
        official_pmod.pmod_config({**BASE, **values}, "llava_next", WHERE)


def test_vision_hr_is_every_image_token_without_anyres():
    values = {
        **BASE,
        "mod_target_layers": "interleave",
        "mod_router_factor": 0.5,
        "mod_target_token_type": "vision_hr",
    }
    assert official_pmod.pmod_config(values, "llava", WHERE).routed_tokens == "vision"


# ---- LLaVA's stage-1 projector as the pretrained connector -------------------------------------------


def test_llava_mm_projector_bin_is_a_pretrained_connector(tmp_path):
    model, _ = tiny_model(layers=2)
    projector = model.model.multi_modal_projector
    saved = {
        "model.mm_projector.0.weight": torch.randn_like(projector.linear_1.weight),
        "model.mm_projector.0.bias": torch.randn_like(projector.linear_1.bias),
        "model.mm_projector.2.weight": torch.randn_like(projector.linear_2.weight),
        "model.mm_projector.2.bias": torch.randn_like(projector.linear_2.bias),
    }
    torch.save(saved, tmp_path / "mm_projector.bin")
    for source in (tmp_path / "mm_projector.bin", tmp_path):  # the file or its directory
        with torch.no_grad():
            projector.linear_1.weight.zero_()
        assert load_connector(model, source) == sorted(
            f"model.multi_modal_projector.{n}" for n, _ in projector.named_parameters()
        )
        assert torch.equal(projector.linear_1.weight, saved["model.mm_projector.0.weight"])
        assert torch.equal(projector.linear_2.bias, saved["model.mm_projector.2.bias"])


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_projector_file_holding_code_is_refused(tmp_path):
    with open(tmp_path / "mm_projector.bin", "wb") as file:
        pickle.dump({"model.mm_projector.0.weight": _Payload()}, file, protocol=2)
    model, _ = tiny_model(layers=2)
    with pytest.raises(UserError, match="holds more than tensors"):
        load_connector(model, tmp_path / "mm_projector.bin")
