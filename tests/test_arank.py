"""ARank's pieces without a model: the rank of attention maps of known rank, the proposal, the
result file, and reading image-question samples."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pmod_cli.analysis.arank import (
    ARankResult,
    attention_rank,
    load_arank_layers,
    load_arank_result,
    propose_layers,
)
from pmod_cli.analysis.report import format_layers, tied_at_cut
from pmod_cli.data.questions import read_image_questions
from pmod_cli.errors import UserError

N = 12


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    """(n, n) logits -> a causal attention map (each row a distribution over tokens 0..i)."""
    n = logits.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def one_hot_map(targets: list[int]) -> torch.Tensor:
    """Row i attends only to token targets[i] (targets[i] <= i)."""
    rows = torch.zeros(len(targets), len(targets))
    rows[torch.arange(len(targets)), torch.tensor(targets)] = 1.0
    return rows


def test_a_head_that_attends_only_to_itself_has_rank_zero():
    # the diagonal is zeroed: without that this map would have full rank N
    assert attention_rank(torch.eye(N)).item() == 0


def test_a_sink_head_has_rank_one():
    # every token attends to token 0; token 0's own weight sits on the zeroed diagonal
    assert attention_rank(one_hot_map([0] * N)).item() == 1


@pytest.mark.parametrize("block", [2, 3, 5])
def test_block_sinks_have_one_rank_per_block_with_more_than_one_token(block):
    targets = [
        i - i % block for i in range(N)
    ]  # each token attends to the first token of its block
    blocks_with_followers = len({t for i, t in enumerate(targets) if t != i})
    assert attention_rank(one_hot_map(targets)).item() == blocks_with_followers


def test_dense_causal_heads_have_rank_n_minus_one():
    uniform = causal_softmax(torch.zeros(N, N))
    previous_token = one_hot_map([0] + list(range(N - 1)))
    random = causal_softmax(torch.randn(N, N, generator=torch.Generator().manual_seed(0)))
    assert attention_rank(torch.stack([uniform, previous_token, random])).tolist() == [N - 1] * 3


def test_low_rank_causal_map_built_from_a_few_sources():
    # rows mix 3 source tokens (0, 1, 2) with random weights: rank 3 once the early rows are past
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(N, 3, generator=generator)
    attention = torch.zeros(N, N)
    for row in range(3, N):
        attention[row, :3] = weights[row] / weights[row].sum()
    for row in range(3):
        attention[row, row] = 1.0  # early tokens attend to themselves
    assert attention_rank(attention).item() == 3


def test_default_tolerance_ignores_rounding_noise_but_counts_small_real_attention():
    sink = one_hot_map([0] * N)
    noise = torch.zeros(N, N)
    noise[5:, 3] = 1e-9  # far below sigma_max * n * eps(float32)
    assert attention_rank(sink + noise).item() == 1
    real = torch.zeros(N, N)
    real[5:, 3] = 1e-3  # a weak but real second source
    assert attention_rank(sink + real).item() == 2


def test_heads_are_ranked_one_by_one_and_half_precision_maps_work():
    heads = torch.stack(
        [torch.eye(N), one_hot_map([0] * N), causal_softmax(torch.zeros(N, N))]
    )  # (heads, n, n)
    assert attention_rank(heads).tolist() == [0, 1, N - 1]
    assert attention_rank(heads.to(torch.bfloat16)).tolist() == [0, 1, N - 1]
    untouched = heads.clone()
    attention_rank(heads)
    assert torch.equal(heads, untouched)  # the caller's maps keep their diagonal


def test_the_k_highest_arank_layers_stay_dense():
    aranks = [10.0, 50.0, 30.0, 50.0, 5.0, 40.0]
    assert propose_layers(aranks, 3) == ([1, 3, 5], [0, 2, 4])
    # a tie at the cut goes to the earlier layer
    assert propose_layers(aranks, 1) == ([1], [0, 2, 3, 4, 5])
    assert propose_layers(aranks, 0) == ([], list(range(6)))


@pytest.mark.parametrize("dense", [6, 7, -1])
def test_a_dense_layer_count_that_leaves_no_mod_layer_is_a_user_error(dense):
    with pytest.raises(UserError, match="--dense-layers"):
        propose_layers([1.0] * 6, dense)


def result(**overrides) -> ARankResult:
    values = dict(
        model="ckpt", samples=3, arank=[5.0, 1.0, 4.0, 2.0], dense_layers=[0, 2], mod_layers=[1, 3]
    )
    return ARankResult(**{**values, **overrides})


def test_result_file_round_trip_gives_the_mod_layers(tmp_path):
    path = result(tokens=[9.0, 7.0, 9.0, 7.0], checkpoint_mod_layers=[1]).save(
        tmp_path / "sub" / "arank.json"
    )
    assert set(json.loads(path.read_text())) >= {
        "arank",
        "dense_layers",
        "mod_layers",
        "model",
        "samples",
    }
    assert load_arank_layers(path) == [1, 3]
    assert load_arank_layers(path, num_layers=4) == [1, 3]
    assert load_arank_result(path) == result(tokens=[9.0, 7.0, 9.0, 7.0], checkpoint_mod_layers=[1])


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("{not json", "cannot read"),
        (json.dumps({"arank": [1.0]}), "missing model, samples, dense_layers, mod_layers"),
        (
            json.dumps({**result().to_dict(), "mod_layers": [1, 9]}),
            "mod_layers must be a list of layer indices in 0..3",
        ),
        (json.dumps({**result().to_dict(), "arank": "high"}), "arank must be a list of numbers"),
    ],
)
def test_a_bad_result_file_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "arank.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_arank_layers(path)


def test_result_file_of_another_model_size_is_a_user_error(tmp_path):
    path = result().save(tmp_path / "arank.json")
    with pytest.raises(UserError, match="4-layer model but this model has 32 layers"):
        load_arank_layers(path, num_layers=32)


def test_format_layers_groups_runs():
    assert format_layers([7, 3, 4, 5, 10]) == "3-5, 7, 10"
    assert format_layers([]) == "none"


def write_samples(tmp_path, samples):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "img" / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path


def conversation(question):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "an answer"}]


def test_questions_are_first_user_turns_of_image_samples_in_file_order(tmp_path):
    data = write_samples(
        tmp_path,
        [
            {"id": "text", "conversations": conversation("no image here")},
            {
                "id": "bad",
                "image": "a.png",
                "conversations": [{"from": "gpt", "value": "reply first"}],
            },
            {
                "id": 1,
                "image": "a.png",
                "conversations": conversation("<image>\nWhat colour?")
                + [{"from": "human", "value": "second question"}, {"from": "gpt", "value": "x"}],
            },
            {"id": 2, "image": "a.png", "conversations": conversation("How many?\n<image>")},
            {"id": 3, "image": "a.png", "conversations": conversation("<image> Third")},
        ],
    )
    read = read_image_questions(data, tmp_path / "img", limit=2)
    assert [(q.sample_id, q.question) for q in read.questions] == [
        ("1", "What colour?"),
        ("2", "How many?"),
    ]
    assert read.questions[0].image == tmp_path / "img" / "a.png"
    assert read.skipped == 2


def test_a_missing_or_unreadable_image_is_a_user_error_naming_the_sample(tmp_path):
    data = write_samples(
        tmp_path, [{"id": "s7", "image": "a.png", "conversations": conversation("<image>\nq")}]
    )
    with pytest.raises(
        UserError, match=r"image .*a\.png of sample s7 not found; pass --image-folder"
    ):
        read_image_questions(
            data, None, limit=4
        )  # default folder: the data file's, where a.png is not
    (tmp_path / "img" / "a.png").write_text("not an image")
    with pytest.raises(UserError, match="of sample s7 is unreadable"):
        read_image_questions(data, tmp_path / "img", limit=4)


def test_question_only_and_fastchat_style_samples_are_read(tmp_path):
    data = write_samples(
        tmp_path,
        [
            {"id": "odd-image", "image": 7, "conversations": conversation("<image>\nskipped")},
            {
                "id": "question",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}],
            },
            {
                "id": "greeting",
                "image": "a.png",
                "conversations": [
                    {"from": "gpt", "value": "Hi! Ask me."},
                    *conversation("<image>\nHow many?"),
                ],
            },
        ],
    )
    read = read_image_questions(data, tmp_path / "img", limit=4)
    assert [(q.sample_id, q.question) for q in read.questions] == [
        ("question", "What colour?"),
        ("greeting", "How many?"),
    ]
    assert read.skipped == 1


def test_a_decompression_bomb_is_a_user_error_not_a_traceback(tmp_path, monkeypatch):
    data = write_samples(
        tmp_path, [{"id": "s1", "image": "a.png", "conversations": conversation("<image>\nq")}]
    )
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 20x20 is a decompression bomb now
    with pytest.raises(UserError, match=r"of sample s1 is unreadable \(DecompressionBombError\)"):
        read_image_questions(data, tmp_path / "img", limit=4)


def test_tiny_shapes_data_finds_its_images_without_an_image_folder(tmp_path, monkeypatch):
    from pmod_cli.data.tiny import tiny_root

    monkeypatch.setenv("PMOD_CACHE", str(tmp_path / "cache"))
    shapes = tiny_root() / "shapes"
    (shapes / "images" / "heldout").mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(shapes / "images" / "heldout" / "h.png")
    sample = {
        "id": "h",
        "image": "heldout/h.png",
        "conversations": conversation("<image>\nColour?"),
    }
    (shapes / "heldout.json").write_text(json.dumps([sample]))
    read = read_image_questions(shapes / "heldout.json", None, limit=4)
    assert read.questions[0].image == shapes / "images" / "heldout" / "h.png"


def test_a_file_without_image_questions_is_a_user_error(tmp_path):
    data = write_samples(tmp_path, [{"id": "t", "conversations": conversation("hello")}])
    with pytest.raises(UserError, match="holds no sample with an image and a question"):
        read_image_questions(data, tmp_path / "img", limit=4)


def test_a_tie_at_the_dense_mod_cut_is_reported():
    assert tied_at_cut(
        result(arank=[5.0, 4.0, 4.0, 1.0], dense_layers=[0, 1], mod_layers=[2, 3])
    ) == [1, 2]
    assert (
        tied_at_cut(result(arank=[5.0, 4.0, 3.0, 3.0], dense_layers=[0, 1], mod_layers=[2, 3]))
        == []
    )
    assert (
        tied_at_cut(result(arank=[5.0, 4.0, 3.0, 3.0], dense_layers=[], mod_layers=[0, 1, 2, 3]))
        == []
    )
