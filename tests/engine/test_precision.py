"""The precision the base computes in: bf16 on a CPU that multiplies it natively
(rlhf.model_stack.compute_dtype), and what must still hold there: KL 0 at the
first rollout, ratio 1 before the first step, and sampled log-probs that teacher
forcing reads back within bf16's resolution."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.model_options import ModelOptions
from rlhf.model_stack import compute_dtype, cpu_has_bf16
from rlhf.models import load_stack
from rlhf.ppo_config import PPOConfig
from rlhf.ppo_rollout import rule_scorer
from rlhf.ppo_session import PPOSession
from rlhf.sampling import SamplingParams, sample_k
from rlhf.tokens import teacher_forced_logprobs

EPYC = "flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512vl\n"
OLDER = "flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw avx512vl\n"
GRAVITON = "Features\t: fp asimd evtstrm aes sha2 bf16 i8mm\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [(EPYC, True), (OLDER, False), (GRAVITON, True)])
def test_a_cpu_computes_in_bf16_only_where_it_multiplies_bf16_natively(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n" + cpuinfo)
    assert cpu_has_bf16(path) is native
    assert cpu_has_bf16(tmp_path / "absent") is False  # not Linux: fp32, the safe choice


def test_a_requested_precision_wins_and_a_wrong_one_is_named(cli_db, capsys):
    assert compute_dtype(torch.device("cpu"), "float32") == torch.float32
    assert compute_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(UserError, match="unknown precision 'int8'"):
        ModelOptions(dtype="int8")
    with pytest.raises(SystemExit):
        main(["--db", str(cli_db), "sample", "--dtype", "int8"])
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err


@pytest.fixture
def bf16_stack(tiny_dir):
    torch.manual_seed(0)
    stack = load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu", dtype="bfloat16"))
    assert stack.precision == "bfloat16"
    assert stack.peft.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    return stack


def test_in_bf16_ppo_starts_at_the_reference_with_ratio_one(bf16_stack):
    config = PPOConfig(batch_size=8, mini_batch_size=4, forward_batch_size=8, epochs=2, max_new_tokens=6,
                       learning_rate=1e-3, seed=0)
    seen = []
    session = PPOSession(bf16_stack, rule_scorer("rule:distinct", bf16_stack.tokenizer.eos_token_id, 6),
                         PROMPTS, config, on_minibatch=seen.append)
    metrics, batch = session.iteration(1)
    assert batch.kl.abs().max().item() < 1e-5
    assert seen[0]["val/ratio"] == pytest.approx(1.0, abs=1e-3)
    assert seen[0]["policy/clipfrac"] == 0.0


def test_in_bf16_sampled_log_probs_are_what_teacher_forcing_reads(bf16_stack):
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=8, seed=1)
    rows = sample_k(bf16_stack, ["short", "a longer prompt, so that the other one is left-padded"], 2, params)
    for sample in (s for row in rows for s in row):
        [recomputed] = teacher_forced_logprobs(bf16_stack, "policy", sample.prompt_ids, [sample.token_ids],
                                               params.temperature)
        # bf16 keeps 8 bits of mantissa: sums of a few hundred terms agree to about 1%.
        assert recomputed == pytest.approx(sample.logprobs, rel=1e-2, abs=1e-2)
