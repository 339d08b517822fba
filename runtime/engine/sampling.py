"""Per-request sampler chains: each sequence samples with its own llama.cpp chain, seeded and grammar-bound on its own."""

from __future__ import annotations

import random

import llama_cpp as llama
import numpy as np

from sealbox.runtime.engine.base import SamplingParams, TokenLogprob
from sealbox.runtime.engine.base import GrammarError
from sealbox.runtime.engine.llama_backend import Context, Model

PENALTY_WINDOW = 64
"""Tokens the repeat penalty looks back over (llama.cpp's default)."""


class SamplerChain:
    """A llama.cpp sampler chain for one request: [penalties] [grammar] then greedy, or top-k/top-p/min-p/temp/dist.

    Grammar runs before the truncating samplers so that a constrained token is never cut away by top-k.
    """

    def __init__(self, model: Model, params: SamplingParams, prompt_tokens: list[int], *, logprobs: int | None = None) -> None:
        """`logprobs`: report each sampled token's log-probability and this many alternatives (None: off)."""
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._handle = llama.llama_sampler_chain_init(chain_params)
        self._model = model
        self._logprobs = logprobs
        self._bias = np.zeros(model.n_vocab, dtype=np.float32) if params.logit_bias else None
        self._argmax = (params.temperature <= 0.0 and not params.logit_bias and params.grammar is None
                        and params.repeat_penalty == 1.0 and not params.frequency_penalty
                        and not params.presence_penalty)  # fmt: skip
        """Greedy with nothing before it: the chain would only pick the first largest logit, which numpy does without
        copying the whole vocabulary into llama.cpp's candidate array (1.2 ms a token for Gemma's 262,144, measured
        here: 6% of a decode step at 16 sequences)."""
        try:
            if params.logit_bias:
                entries = (llama.llama_logit_bias * len(params.logit_bias))()
                for entry, (token, bias) in zip(entries, params.logit_bias):
                    entry.token, entry.bias = token, bias
                    self._bias[token] += bias  # type: ignore[index]
                llama.llama_sampler_chain_add(
                    self._handle, llama.llama_sampler_init_logit_bias(model.n_vocab, len(params.logit_bias), entries)
                )
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
        if self._argmax:  # the chain holds no state to accept a token into
            return int(context.logits_view(batch_index).argmax())
        return llama.llama_sampler_sample(self._handle, context.handle, batch_index)

    @property
    def wants_logprobs(self) -> bool:
        return self._logprobs is not None

    def logprob(self, context: Context, batch_index: int, token: int) -> TokenLogprob:
        """The log-probability of `token` and the top alternatives, from the logits at `batch_index` plus the
        request's logit bias: what the sampler chain saw before temperature and truncation."""
        logits = context.logits(batch_index).astype(np.float64)
        if self._bias is not None:
            logits += self._bias
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        top: tuple[tuple[int, bytes, float], ...] = ()
        k = min(self._logprobs or 0, len(logprobs))
        if k:
            best = np.argpartition(-logprobs, k - 1)[:k]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            piece = self._model.piece
            top = tuple((int(t), piece(int(t)), float(logprobs[t])) for t in best)
        return TokenLogprob(token=token, piece=self._model.piece(token), logprob=float(logprobs[token]), top=top)

    def free(self) -> None:
        if self._handle:
            llama.llama_sampler_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.free()
