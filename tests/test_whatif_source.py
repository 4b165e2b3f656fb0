"""`whatif --from-server`'s reader (plugin/live/whatif_source.py) on a fixed /metrics text.

Unit test: the two documents a server returns are given as text (no server); the reader must
take the KV capacity from vLLM's own cache_config_info, TP from the ranks, and the routing from
the plugin's per-layer counters. The real-server run is benchmarks/bench_whatif_server.py and
tests/integration/test_whatif_server.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_reuse.plugin.live.whatif_source import facts_from, parse_metrics
from moe_reuse.predictor import SpecError, expected_distinct_experts, load_hardware_preset
from moe_reuse.predictor.whatif import Workload
from moe_reuse.predictor.whatif_server import whatif_from_server

CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 512,
    "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
    "max_position_embeddings": 2048, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "torch_dtype": "bfloat16",
}


def metrics(ranks: tuple[str, ...] = ("0",), touched: float = 5.0) -> str:
    """4 MoE layers, 100 decode(+mixed) steps of 6 decode requests, `touched` experts/layer/step."""
    lines = [
        "# TYPE moe_reuse_info gauge",
        *(f'moe_reuse_info{{engine="0",model="m",rank="{r}",experts="8",top_k="2",hardware="h200"}} 1.0'
          for r in ranks),
        "# TYPE vllm:cache_config_info gauge",
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="1234"} 1.0',
        "# TYPE moe_reuse_steps counter",
        "# TYPE moe_reuse_batch_requests counter",
        "# TYPE moe_reuse_experts_touched counter",
    ]
    for r in ranks:
        lines += [
            f'moe_reuse_steps_total{{rank="{r}",kind="decode"}} 80.0',
            f'moe_reuse_steps_total{{rank="{r}",kind="mixed"}} 20.0',
            f'moe_reuse_steps_total{{rank="{r}",kind="prefill"}} 7.0',
            f'moe_reuse_batch_requests_total{{rank="{r}",phase="decode"}} 600.0',
            f'moe_reuse_batch_requests_total{{rank="{r}",phase="prefill"}} 9.0',
        ]
        for layer in range(4):
            lines.append(
                f'moe_reuse_experts_touched_total{{rank="{r}",layer="{layer}",phase="decode"}} {100 * touched}'
            )
            lines.append(
                f'moe_reuse_experts_touched_total{{rank="{r}",layer="{layer}",phase="prefill"}} 999.0'
            )
    return "\n".join(lines) + "\n"


@pytest.fixture()
def served(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return {"data": [{"id": "tiny", "root": str(tmp_path), "max_model_len": 1024}]}


def test_parse_routing_and_batch_from_the_plugins_counters():
    m = parse_metrics(metrics(("0", "1"), touched=5.0))
    assert m["ranks"] == 2
    assert m["distinct_per_layer"] == pytest.approx(5.0)  # 500 per layer / 100 steps
    assert m["decode_batch"] == pytest.approx(6.0)  # 600 requests / 100 steps
    assert m["cache"]["num_gpu_blocks"] == "1234"


def test_facts_take_vllms_kv_capacity_tp_and_fitted_routing(served):
    facts = facts_from(metrics(("0", "1"), touched=5.0), served, url="http://x")
    assert facts.kv_capacity_tokens == 1234 * 16
    assert facts.partition.tp == 2 and facts.max_model_len == 1024
    assert facts.hardware.name == "h200"
    assert facts.routing is not None
    # Uniform routing of 6 tokens over 8 experts with top-2 touches 6.4; 5 is skewed.
    assert expected_distinct_experts(8, 2, 6) > 5.0
    assert facts.routing.distinct(6) == pytest.approx(5.0, rel=1e-6)
    assert facts.routing.effective_experts < 8


def test_whatif_from_server_uses_the_served_capacity(served):
    facts = facts_from(metrics(), served)
    r = whatif_from_server(facts, [1, 4, 64], Workload(32, 32, 2048, 64))
    assert r.moe.kv_capacity_tokens == 1234 * 16 and r.moe.routing is facts.routing
    assert r.dense.partition.ep == 1 and r.dense.partition.tp == facts.partition.tp
    assert [m.batch for m, _ in r.levels] == [1, 4, 64]


def test_missing_plugin_is_a_clear_error(served):
    text = 'vllm:cache_config_info{block_size="16",num_gpu_blocks="1"} 1.0\n'
    with pytest.raises(SpecError, match="--from-server: no moe_reuse_info"):
        facts_from(text, served, load_hardware_preset("h200"))


def with_limits(text: str, batched: str, seqs: str) -> str:
    """The same /metrics with the scheduler limits a plugin publishes in moe_reuse_info."""
    return text.replace('hardware="h200"}',
                        f'hardware="h200",max_num_batched_tokens="{batched}",max_num_seqs="{seqs}"}}')


def test_facts_take_the_served_scheduler_limits(served):
    facts = facts_from(with_limits(metrics(), "2048", "48"), served)
    assert (facts.max_num_batched_tokens, facts.max_num_seqs) == (2048, 48)
    old = facts_from(metrics(), served)  # an older plugin: unknown, so the defaults stand
    assert (old.max_num_batched_tokens, old.max_num_seqs) == (0, 0)
    bad = facts_from(with_limits(metrics(), "lots", "-3"), served)
    assert (bad.max_num_batched_tokens, bad.max_num_seqs) == (0, 0)


@pytest.mark.parametrize(("flags", "want"), [
    ([], (2048, 48)),  # the server's
    (["--max-num-batched-tokens", "4096"], (4096, 48)),  # a flag wins over the server
    (["--max-num-seqs", "5"], (2048, 5)),
])
def test_whatif_from_server_models_the_served_budget_and_seats(served, monkeypatch, capsys,
                                                                flags, want):
    from moe_reuse.plugin.live import whatif_source
    from moe_reuse.predictor.cli import main

    text = with_limits(metrics(), "2048", "48")
    monkeypatch.setattr(whatif_source, "read_server",
                        lambda url, hw=None: facts_from(text, served, hw, url=url))
    code = main(["whatif", "--from-server", "http://x", "--concurrency", "1,64",
                 "--prompt-len", "32", "--output-len", "32", "--json", *flags])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    work = out["workload"]
    assert (work["max_num_batched_tokens"], work["max_num_seqs"]) == want
    assert out["levels"][-1]["moe"]["batch"] <= want[1]


def test_whatif_without_a_server_keeps_vllms_defaults(capsys):
    from moe_reuse.predictor.cli import main

    assert main(["whatif", "--model", "qwen3-235b-a22b", "--concurrency", "8", "--json"]) == 0
    work = json.loads(capsys.readouterr().out)["workload"]
    assert (work["max_num_batched_tokens"], work["max_num_seqs"]) == (8192, 0)


def with_parallel(text: str, tp: int, pp: int, dp: int, ep: int) -> str:
    """The same /metrics with the parallel sizes a plugin publishes in moe_reuse_info."""
    return text.replace('hardware="h200"}', f'hardware="h200",tp="{tp}",pp="{pp}",dp="{dp}",ep="{ep}"}}')


@pytest.mark.parametrize(("ranks", "sizes", "want"), [
    (("0", "1"), None, (1, 2, 1, 1)),  # an older plugin: TP from the ranks
    (("0", "1"), (2, 1, 1, 2), (1, 2, 1, 2)),  # TP 2 with EP over its 2 GPUs
    (("0", "1", "2", "3"), (2, 2, 1, 1), (1, 2, 2, 1)),  # PP 2: four ranks, but TP 2
    (("0",), (1, 1, 2, 1), (1, 1, 1, 1)),  # DP 2 without EP: one engine (a replica)
])
def test_the_partition_is_the_served_one(served, ranks, sizes, want):
    text = metrics(ranks) if sizes is None else with_parallel(metrics(ranks), *sizes)
    part = facts_from(text, served).partition
    assert (part.dp, part.tp, part.pp, part.ep) == want


def test_dp_attention_with_experts_over_every_engine_models_the_whole_deployment(served):
    """DP attention + EP (ep = tp x dp): no engine stands alone, so the partition and the KV
    capacity are the deployment's, and one engine's measured routing is carried to the tokens
    of all four engines, which every GPU's experts serve."""
    facts = facts_from(with_parallel(metrics(), 1, 1, 4, 4), served)
    part = facts.partition
    assert (part.dp, part.tp, part.pp, part.ep) == (4, 1, 1, 4)
    assert facts.kv_capacity_tokens == 4 * 1234 * 16  # four engines' caches
    r = whatif_from_server(facts, [4, 24], Workload(32, 32, 2048, 64))
    assert r.moe.partition == part and r.dense.partition.ep == 1
    # 24 sequences over 4 engines: 6 per engine, the measured batch; the experts see all 24
    moe24 = r.levels[-1][0]
    assert moe24.batch == 24
    assert facts.routing is not None
    assert facts.routing.distinct(24) > facts.routing.distinct(6) == pytest.approx(5.0, rel=1e-6)
