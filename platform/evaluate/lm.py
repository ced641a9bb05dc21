"""This project's model as an lm-eval 0.4 model, registered as "mamba-slm".

    lm_eval.simple_evaluate(model="mamba-slm", model_args={"pretrained": "<model dir>"}, ...)

or pass a `MambaSlmLM` instance. Scoring pads batches on the right: every mixer is
causal, so padding after a sequence cannot change its logits. Generation decodes with the
model's inference cache (Mamba-2 states + KV cache); a Mamba-2 state has no notion of
padding, so a generation batch holds prompts of equal token length only.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mamba_slm.model.generation import sample_next

from .checkpoint import LoadedModel, load_checkpoint, resolve_device

log = logging.getLogger(__name__)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("mamba-slm")
class MambaSlmLM(TemplateLM):
    """loglikelihood / loglikelihood_rolling / generate_until over a `HybridLM`.

    pretrained: a checkpoint directory (see `checkpoint.load_checkpoint`), or give
    `loaded` (an already loaded model + tokenizer). dtype: "float32", or "bfloat16" /
    "float16" to run under autocast (GPU).
    """

    def __init__(self, pretrained: str | None = None, loaded: LoadedModel | None = None,
                 batch_size: int | str = 8, device: str | None = None, dtype: str = "float32",
                 max_length: int | None = None, max_gen_toks: int = 256,
                 tokenizer: str | None = None, **unused) -> None:
        super().__init__()
        if unused:
            log.info("mamba-slm: ignoring lm-eval arguments %s", sorted(unused))
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
        if loaded is None:
            if not pretrained:
                raise ValueError("mamba-slm needs pretrained=<checkpoint dir>")
            loaded = load_checkpoint(pretrained, device=resolve_device(device), tokenizer_file=tokenizer)
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self._device = next(self.model.parameters()).device
        self.autocast_dtype = DTYPES[dtype]
        self.vocab_size = self.model.config.vocab_size
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)

    # Tokenizer ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.loaded.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.source)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # Scoring --------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) -> float32 log-probs over the real vocabulary, (B, T, vocab)."""
        with torch.autocast(self._device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits = self.model(ids, cache=cache).logits[..., :self.vocab_size]
        return F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_ids, continuation_ids). The input is
        the last max_length tokens of context + continuation[:-1]; the continuation's
        tokens are scored at the end of it."""
        rows = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self.max_length + 1):]
            rows.append((whole[:-1], cont[-min(len(cont), len(whole) - 1):]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: OOM early
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = order[start:start + self.batch_size]
            width = len(rows[batch[0]][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
            logprobs = self._forward(ids.to(self._device))
            for j, i in enumerate(batch):
                inp, cont = rows[i]
                n = len(cont)
                lp = logprobs[j, len(inp) - n:len(inp)]  # (n, vocab)
                target = torch.tensor(cont, device=lp.device)
                score = lp.gather(1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length tokens, each
        prediction conditioned on the EOS prefix or the previous window (lm-eval's scheme)."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (score, _) in zip(owner, scores):
            totals[k] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # Generation -----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen = dict(gen_kwargs or {})
            # Prompt + continuation fit in max_length and the last prompt token is always
            # kept: with max_gen_toks >= max_length the slice below would be [-0:] (the
            # whole prompt, past max_length) or [k:], k = max_gen_toks - max_length (the
            # prompt minus its first k tokens: nothing of a short one).
            max_new = max(0, min(int(gen.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            prompts.append(ids)
            groups[(len(ids), json.dumps(gen, sort_keys=True, default=str), max_new)].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for (_, gen_json, max_new), members in sorted(groups.items(), key=lambda kv: -kv[0][0]):
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], json.loads(gen_json), max_new)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], gen: dict, max_new: int) -> list[str]:
        """Equal-length prompts -> continuations cut at the first stop string or EOS."""
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.get("temperature", 0.0)) if gen.get("do_sample") else 0.0
        top_p, top_k = float(gen.get("top_p", 1.0)), int(gen.get("top_k", 0) or 0)
        ids = torch.tensor(prompts, dtype=torch.long, device=self._device)
        cache = self.model.new_cache(ids.shape[0], max_len=ids.shape[1] + max_new)
        logprobs = self._forward(ids, cache=cache)[:, -1]
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        seen = ids
        for _ in range(max_new):
            nxt = sample_next(logprobs, seen, temperature, top_k, top_p)
            seen = torch.cat([seen, nxt[:, None]], dim=1)
            for j, tok in enumerate(nxt.tolist()):
                if done[j]:
                    continue
                if tok == self.eot_token_id:
                    done[j] = True
                    continue
                new[j].append(tok)
                done[j] = any(s in self.tok_decode(new[j]) for s in until)
            if all(done):
                break
            logprobs = self._forward(nxt[:, None], cache=cache)[:, -1]
        texts = []
        for toks in new:
            text = self.tok_decode(toks)
            for s in until:
                text = text.split(s)[0] if s else text
            texts.append(text)
        return texts
