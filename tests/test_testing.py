"""posttrain.testing: the tiny model factory and the conformance check plugins run."""

import pytest
import torch

from posttrain import LossTerm, hookimpl
from posttrain.testing import PluginContractError, check_algorithm_plugin, make_tiny_model, tiny_groups


def test_tiny_model_loads_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "m", hidden=32, layers=1, heads=2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) == len("Q: 1+1=\nA: ")  # one token per character
    assert tok.decode(ids) == text
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


def test_tiny_groups_cover_the_cases():
    g = tiny_groups()
    assert [x.num_correct() for x in g.values()] == [0, 2, 4, 1]
    assert len(g["two_teachers"].demonstrations) == 2


@pytest.mark.parametrize("name", ["grpo", "sft"])
def test_builtins_pass_the_conformance_check(name):
    report = check_algorithm_plugin(name)
    assert report["loss"] == report["loss"]  # finite
    expected = {"grpo": ["rl", "rl", "rl", "rl"], "sft": ["sft", "sft", "sft", "sft"]}[name]
    assert report["routes"] == expected


def test_conformance_check_names_the_broken_rule():
    class PerMicroBatchMean:  # normalises by the micro-batch's own token count: not allowed
        @hookimpl
        def build_loss(self, batch, outputs):
            m = batch.response_mask.float()
            return [LossTerm("nll", -(outputs.logprobs * m).sum() / m.sum())]

    with pytest.raises(PluginContractError, match="build_loss: loss depends on micro-batching"):
        check_algorithm_plugin("grpo", plugins=[PerMicroBatchMean()])

    class BadShape:
        @hookimpl
        def compute_advantage(self, batch):
            return torch.zeros(3, 3, 3)

    with pytest.raises(PluginContractError, match=r"compute_advantage: must return \[N\] or \[N, L\]"):
        check_algorithm_plugin("grpo", plugins=[BadShape()])
