"""The V1 step layout's prefill rule matches V2's (plain objects standing in for vLLM's)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np

from moe_reuse.plugin.vllm.runners import PrefillLengths


def _out(new=(), resumed=(), all_ids=None, finished=()):  # type: ignore[no-untyped-def]
    return NS(scheduled_new_reqs=[NS(req_id=r, prompt_token_ids=[0] * n, prefill_token_ids=None)
                                  for r, n in new],
              scheduled_cached_reqs=NS(resumed_req_ids=set(resumed), all_token_ids=all_ids or {}),
              finished_req_ids=set(finished))


def test_a_resumed_request_prefills_all_its_tokens_then_decodes() -> None:
    p = PrefillLengths()
    p.update(_out(new=[("a", 10), ("b", 7)]))
    assert p.by_req == {}  # new requests prefill their prompt: nothing kept, no per-request work
    assert p.lengths(["a", "b"], np.array([10, 7])).tolist() == [10, 7]
    # "a" was preempted after 5 output tokens and comes back: prompt + outputs are recomputed
    p.update(_out(resumed=["a"], all_ids={"a": list(range(15)), "b": list(range(9))}))
    assert p.lengths(["b", "a"], np.array([7, 10])).tolist() == [7, 15]  # "b" not resumed
    computed = np.array([8, 12])  # "a" has 12 of its 15 cached (prefix hit): still prefilling
    assert (computed >= p.lengths(["b", "a"], np.array([7, 10]))).tolist() == [True, False]
    p.update(_out(finished=["a"]))
    assert p.lengths(["a", None], np.array([10, 3])).tolist() == [10, 3]  # unknown: the prompt


def test_a_new_request_whose_prefill_is_longer_than_its_prompt_is_kept() -> None:
    p = PrefillLengths()
    new = NS(req_id="c", prompt_token_ids=[0] * 4, prefill_token_ids=[0] * 9)
    p.update(NS(scheduled_new_reqs=[new], scheduled_cached_reqs=None, finished_req_ids=()))
    assert p.lengths(["x", "c"], np.array([3, 4])).tolist() == [3, 9]
