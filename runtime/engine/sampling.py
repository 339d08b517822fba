"""Per-request sampler chains: each sequence samples with its own llama.cpp chain, seeded and grammar-bound on its own."""

from __future__ import annotations

import random

import llama_cpp as llama

from sealbox.runtime.engine.base import SamplingParams
from sealbox.runtime.engine.errors import GrammarError
from sealbox.runtime.engine.llama_backend import Context, Model

PENALTY_WINDOW = 64
"""Tokens the repeat penalty looks back over (llama.cpp's default)."""


class SamplerChain:
    """A llama.cpp sampler chain for one request: [penalties] [grammar] then greedy, or top-k/top-p/min-p/temp/dist.

    Grammar runs before the truncating samplers so that a constrained token is never cut away by top-k.
    """

    def __init__(self, model: Model, params: SamplingParams, prompt_tokens: list[int]) -> None:
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._handle = llama.llama_sampler_chain_init(chain_params)
        try:
            if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
                penalties = llama.llama_sampler_init_penalties(
                    model.n_vocab, PENALTY_WINDOW, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
                )
                # The prompt's tail counts as "recent" too, as it does in llama.cpp's server.
                for token in prompt_tokens[-PENALTY_WINDOW:]:
                    llama.llama_sampler_accept(penalties, token)
                llama.llama_sampler_chain_add(self._handle, penalties)
            if params.grammar is not None:
                grammar = llama.llama_sampler_init_grammar(model.vocab, params.grammar.encode("utf-8"), b"root")
                if not grammar:
                    raise GrammarError("the grammar does not parse (GBNF with a `root` rule expected)")
                llama.llama_sampler_chain_add(self._handle, grammar)
            if params.temperature <= 0.0:
                llama.llama_sampler_chain_add(self._handle, llama.llama_sampler_init_greedy())
            else:
                seed = params.seed if params.seed is not None else random.getrandbits(32)
                if params.top_k > 0:
                    llama.llama_sampler_chain_add(self._handle, llama.llama_sampler_init_top_k(params.top_k))
                if params.top_p < 1.0:
                    llama.llama_sampler_chain_add(self._handle, llama.llama_sampler_init_top_p(params.top_p, 1))
                if params.min_p > 0.0:
                    llama.llama_sampler_chain_add(self._handle, llama.llama_sampler_init_min_p(params.min_p, 1))
                llama.llama_sampler_chain_add(self._handle, llama.llama_sampler_init_temp(params.temperature))
                llama.llama_sampler_chain_add(self._handle, llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        except BaseException:
            self.free()
            raise

    def sample(self, context: Context, batch_index: int) -> int:
        """Sample from the logits at `batch_index` of the last decode, and accept the token into the chain's state."""
        return llama.llama_sampler_sample(self._handle, context.handle, batch_index)

    def free(self) -> None:
        if self._handle:
            llama.llama_sampler_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.free()
