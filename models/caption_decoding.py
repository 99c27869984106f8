"""Fast batched caption decoding for an open_clip CoCa: one image encode, KV-cached token steps.

open_clip's ``CoCa.generate`` re-runs both text towers over the whole prefix, and projects every
position onto the vocabulary, at each step. Here each step feeds one token per row against
per-layer key/value caches, projects only the newest position, and drops finished rows from the
batch. The model's own modules and weights are used, so greedy decoding reproduces ``generate``
(``generation_type="top_k", top_k=1``) token for token. Semantics shared with open_clip/HF:

- max_length counts SOT and EOT (open_clip's ``seq_len``): a sequence holding max_length - 1
  tokens gets EOT without asking the model.
- min_length: EOT is forbidden while the sequence (SOT included) is shorter (HF MinLength).
- repetition_penalty: HF semantics over every token so far, SOT included.
- A generated pad id ends a row like EOT. open_clip's loop stops a row on pad, and with
  open_clip's BPE pad is id 0, which is also the real token "!": "!" can never appear inside a
  caption. Kept for identity.
- sot/eot/pad ids default to open_clip's BPE (49406, 49407, 0); a captioner with a fitted
  tokenizer needs its own (``CaptionerTokenizer.generation_ids()``, models/captioner_tokenizer.py):
  ids outside the model's vocabulary are refused.

Pure: no IO; runs under ``torch.inference_mode`` on the model's device and dtype.
"""

from __future__ import annotations

import heapq
import math

import torch
import torch.nn.functional as F
from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer
from torch import nn

from models.decoding_options import DecodingOptions

SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0  # open_clip SimpleTokenizer
COMPACT_BELOW = 0.75  # compact once live rows are <= this fraction of the cached rows (amortised)


def _check_supported(model: nn.Module) -> tuple[TextTransformer, MultimodalTransformer]:
    """The model's two text towers, or NotImplementedError for variants we cannot cache."""
    text, decoder = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if not isinstance(text, TextTransformer):
        raise NotImplementedError(f"text tower {type(text).__name__} is not supported: only open_clip's "
                                  "TextTransformer (HF text towers are not)")
    if not isinstance(decoder, MultimodalTransformer):
        raise NotImplementedError(f"text decoder {type(decoder).__name__} is not supported: only MultimodalTransformer")
    if text.attn_mask is None:
        raise NotImplementedError("a bidirectional text tower (no_causal_mask=True) cannot be decoded incrementally")
    if not (text.transformer.batch_first and decoder.batch_first):
        raise NotImplementedError("only batch_first transformers are supported")
    for block in (*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn):
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or not isinstance(attn, nn.MultiheadAttention):
            raise NotImplementedError(f"{type(block).__name__} is not supported (block_type='custom', qk_norm, "
                                      "scaled cosine attention, ...): only ResidualAttentionBlock")
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise NotImplementedError("nn.MultiheadAttention with kdim/vdim, bias_kv or add_zero_attn is not supported")
    return text, decoder


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> torch.Tensor:
    return F.linear(x, weight[rows], None if bias is None else bias[rows])


def _self_attention_step(block: ResidualAttentionBlock, x: torch.Tensor, cache: torch.Tensor, t: int,
                         key_mask: torch.Tensor | None) -> torch.Tensor:
    """One causal block on the newest token; x: (R, W); cache: (2, R, H, T, hd), written at t."""
    rows, width = x.shape
    heads = block.attn.num_heads
    qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    qkv = qkv.view(rows, 3, heads, width // heads)  # (R, 3, H, hd)
    cache[:, :, :, t] = qkv[:, 1:].transpose(0, 1)
    # keys 0..t are exactly the causal window of query t
    out = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), cache[0, :, :, : t + 1], cache[1, :, :, : t + 1],
                                         attn_mask=key_mask)  # (R, H, 1, hd)
    x = x + block.ls_1(F.linear(out.reshape(rows, width), block.attn.out_proj.weight, block.attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _cross_attention_step(block: ResidualAttentionBlock, x: torch.Tensor, image_kv: torch.Tensor) -> torch.Tensor:
    """One cross-attention block; x: (R, W); image_kv: (2, R, H, N, hd) from ``_image_keys_values``."""
    rows, width = x.shape
    heads = block.attn.num_heads
    q = _linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias, slice(0, width))
    out = F.scaled_dot_product_attention(q.view(rows, heads, 1, width // heads), image_kv[0], image_kv[1])
    x = x + block.ls_1(F.linear(out.reshape(rows, width), block.attn.out_proj.weight, block.attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _image_keys_values(block: ResidualAttentionBlock, image_embs: torch.Tensor) -> torch.Tensor:
    """Cross-attention keys/values of the image tokens, (2, B, H, N, hd), once per image."""
    batch, tokens, width = image_embs.shape
    heads = block.attn.num_heads
    kv = _linear(block.ln_1_kv(image_embs), block.attn.in_proj_weight, block.attn.in_proj_bias, slice(width, None))
    return kv.view(batch, tokens, 2, heads, width // heads).permute(2, 0, 3, 1, 4).contiguous()


class _DecoderState:
    """Both text towers' KV caches for R rows, fed one token per row per step.

    text_kv: (L_text, 2, R, H, T, hd) and dec_kv: (L_dec, 2, R, H, T, hd) self-attention caches;
    image_kv: (L_dec, 2, R, H, N, hd) cross-attention keys/values; key_mask: (R, 1, 1, T + 1)
    the text tower's additive pad mask (0 / -inf). T = capacity = the most tokens ever fed.
    """

    def __init__(self, model: nn.Module, image_embs: torch.Tensor, capacity: int):
        """image_embs: (B, N, W) the visual tower's tokens (``model._encode_image(images)[1]``)."""
        self.text, self.decoder = _check_supported(model)
        limit = min(self.text.context_length, self.decoder.context_length)
        if capacity > limit:
            raise ValueError(f"{capacity} decoding positions exceed the towers' context length ({limit})")
        rows, device = image_embs.shape[0], image_embs.device
        self.t, self.capacity = 0, capacity
        self.text_kv = self._empty_cache(self.text.transformer, rows, device)
        self.dec_kv = self._empty_cache(self.decoder, rows, device)
        self.image_kv = torch.stack([_image_keys_values(b, image_embs) for b in self.decoder.cross_attn])
        # TextTransformer._build_additive_mask: CLS models mask pad keys; legacy mode shifts it by one
        self.pad_id, self.correct_cls_mask = self.text.pad_id, self.text.correct_cls_mask
        self.uses_pad_mask = self.text.cls_emb is not None
        self.key_mask = torch.zeros(rows, 1, 1, capacity + 1, device=device, dtype=self.text_kv.dtype)
        # (V, W) row-major: the per-step vocabulary projection is ~20% faster on CPU than x @ (W, V)
        self.vocab_weight = self.decoder.text_projection.t().contiguous()

    def _empty_cache(self, tower: nn.Module, rows: int, device: torch.device) -> torch.Tensor:
        heads, width = tower.resblocks[0].attn.num_heads, tower.width
        return torch.empty(len(tower.resblocks), 2, rows, heads, self.capacity, width // heads,
                           device=device, dtype=tower.get_cast_dtype())

    @property
    def rows(self) -> int:
        return self.text_kv.shape[2]

    @property
    def device(self) -> torch.device:
        return self.text_kv.device

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (R,) int64 at position t; return next-token logits (R, V) float32."""
        t = self.t
        assert t < self.capacity, "decoder state is full"
        text = self.text
        x = text.token_embedding(tokens).to(self.text_kv.dtype) + text.positional_embedding[t].to(self.text_kv.dtype)
        key_mask = None
        if self.uses_pad_mask:
            is_pad = (tokens == self.pad_id).view(-1, 1, 1)
            slot = t if self.correct_cls_mask else t + 1  # legacy: key j masked iff token j-1 is pad
            self.key_mask[..., slot] = torch.where(is_pad, float("-inf"), 0.0)
            key_mask = self.key_mask[..., : t + 1]
        for layer, block in enumerate(text.transformer.resblocks):
            x = _self_attention_step(block, x, self.text_kv[layer], t, key_mask)
        if text.cls_emb is None:  # non-CLS towers hand the decoder ln_final'd tokens
            x = text.ln_final(x)
        decoder = self.decoder
        for layer, (block, cross) in enumerate(zip(decoder.resblocks, decoder.cross_attn)):
            x = _self_attention_step(block, x, self.dec_kv[layer], t, None)
            x = _cross_attention_step(cross, x, self.image_kv[layer])
        self.t = t + 1
        return F.linear(decoder.ln_final(x), self.vocab_weight).float()

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) rows: (R',) int64 indices into the current rows."""
        self.text_kv = self.text_kv.index_select(2, rows)
        self.dec_kv = self.dec_kv.index_select(2, rows)
        self.image_kv = self.image_kv.index_select(2, rows)
        self.key_mask = self.key_mask.index_select(0, rows)


def _process_logits(logits: torch.Tensor, history: torch.Tensor, length: int, options: DecodingOptions,
                    eot_id: int) -> torch.Tensor:
    """HF RepetitionPenalty then MinLength on logits (R, V) for the token after `length` tokens."""
    if options.repetition_penalty != 1.0:
        seen = history[:, :length]  # (R, length), SOT included
        score = logits.gather(1, seen)
        score = torch.where(score < 0, score * options.repetition_penalty, score / options.repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if length < options.min_length:
        logits[:, eot_id] = float("-inf")
    return logits


def _sample(logits: torch.Tensor, options: DecodingOptions, generator: torch.Generator) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF warper order); logits (R, V) -> tokens (R,)."""
    logits = logits / options.temperature
    if options.top_k > 0:
        kth = logits.topk(min(options.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= options.top_p  # mass above already reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _decode_rows(state: _DecoderState, options: DecodingOptions, sot_id: int, eot_id: int,
                 pad_id: int) -> torch.Tensor:
    """Greedy or sampled decoding of every row; returns (B, max_length) int64, SOT first."""
    batch, device = state.rows, state.device
    generator = None
    if options.strategy == "sample":
        generator = torch.Generator(device=device).manual_seed(options.seed)
    # unwritten slots stay EOT, so a row that never ends gets its forced EOT at max_length - 1
    history = torch.full((batch, options.max_length), eot_id, dtype=torch.long, device=device)
    history[:, 0] = sot_id
    out = history.clone()  # rows land here, in input order, when compaction drops them
    rows = torch.arange(batch, device=device)  # input index of each cached row
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = history[:, 0]
    for t in range(options.max_length - 2):
        logits = _process_logits(state.step(tokens), history, t + 1, options, eot_id)
        # max(...).indices: same first-maximum choice as argmax, measurably faster on CPU
        tokens = logits.max(dim=-1).indices if generator is None else _sample(logits, options, generator)
        history[:, t + 1] = tokens  # finished rows write garbage after their end; cut later
        done |= (tokens == eot_id) | (tokens == pad_id)
        live = int(done.numel() - done.sum())  # the one host sync per step: stop / compact
        if live == 0:
            break
        if live <= COMPACT_BELOW * done.numel():
            out[rows[done]] = history[done]
            keep = (~done).nonzero().squeeze(1)
            state.select(keep)
            history, rows, done, tokens = history[keep], rows[keep], done[keep], tokens[keep]
    out[rows] = history
    return out


class _BeamPools:
    """Per image, the num_beams best finished hypotheses: min-heaps of (score, serial, tokens).

    A hypothesis's length counts its content tokens plus the EOT that ends it (forced or not);
    score = sum of its chosen tokens' log-probs / length ** length_penalty (a forced EOT adds 0).
    """

    def __init__(self, n_images: int, options: DecodingOptions):
        self.heaps: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(n_images)]
        self.size, self.penalty, self.longest = options.num_beams, options.length_penalty, options.max_length - 1
        self.serial = 0  # breaks score ties so token lists are never compared

    def add(self, image: int, logprob_sum: float, tokens: list[int]) -> None:
        if not math.isfinite(logprob_sum):
            return
        heap = self.heaps[image]
        heapq.heappush(heap, (logprob_sum / (len(tokens) + 1) ** self.penalty, self.serial, tokens))
        self.serial += 1
        if len(heap) > self.size:
            heapq.heappop(heap)

    def is_done(self, image: int, best_live_sum: float, live_tokens: int) -> bool:
        """Whether no live beam (best sum so far, live_tokens content tokens) can still enter the pool."""
        heap = self.heaps[image]
        if len(heap) < self.size:
            return False
        # sums only fall as tokens are added; a positive penalty flatters a negative sum most at the
        # longest length, a negative one at the shortest: this is a true bound, not HF's heuristic
        length = self.longest if self.penalty > 0 else live_tokens + 1
        return best_live_sum / length ** self.penalty <= heap[0][0]

    def best(self, image: int) -> list[int]:
        heap = self.heaps[image]
        return max(heap)[2] if heap else []


def _decode_beams(state: _DecoderState, options: DecodingOptions, sot_id: int, eot_id: int,
                  pad_id: int) -> list[list[int]]:
    """Standard beam search: num_beams live beams per image; returns each image's best content."""
    n_images, beams, device = state.rows, options.num_beams, state.device
    state.select(torch.arange(n_images, device=device).repeat_interleave(beams))  # image K/V shared by its beams
    pools = _BeamPools(n_images, options)
    images, done = list(range(n_images)), [False] * n_images  # per cached group of `beams` rows
    history = torch.full((n_images * beams, options.max_length), eot_id, dtype=torch.long, device=device)
    history[:, 0] = sot_id
    scores = torch.zeros(n_images, beams, device=device)
    scores[:, 1:] = float("-inf")  # identical beams until the first step fans out
    scores, tokens = scores.view(-1), history[:, 0]
    for t in range(options.max_length - 2):
        logp = _process_logits(state.step(tokens), history, t + 1, options, eot_id).log_softmax(dim=-1)
        groups, vocab = len(images), logp.shape[-1]
        cand_scores, cand = (scores[:, None] + logp).view(groups, -1).topk(min(3 * beams, beams * vocab), dim=1)
        # each beam has two ending tokens (EOT, pad), so 3 * beams candidates hold `beams` that go on
        cand_beam, cand_tok = cand // vocab, cand % vocab
        ends = (cand_tok == eot_id) | (cand_tok == pad_id)
        rank = torch.arange(cand.shape[1], device=device)
        pick = torch.where(ends, rank + cand.shape[1], rank).argsort(dim=1)[:, :beams]  # best continuing, in order
        # HF BeamSearchScorer rule: an ending candidate finishes only if it ranks within the top `beams`
        _collect_finished(pools, images, done, history, ends[:, :beams], cand_scores, cand_beam, t, beams)
        src = (torch.arange(groups, device=device)[:, None] * beams + cand_beam.gather(1, pick)).view(-1)
        history = history[src]
        history[:, t + 1] = tokens = cand_tok.gather(1, pick).view(-1)
        scores = cand_scores.gather(1, pick).view(-1)
        state.select(src)
        for g, best in enumerate(scores.view(groups, beams)[:, 0].tolist()):
            done[g] = done[g] or pools.is_done(images[g], best, t + 1)
        if all(done):
            return [pools.best(i) for i in range(n_images)]
        if done.count(False) <= COMPACT_BELOW * groups:
            keep = [g for g in range(groups) if not done[g]]
            rows = (torch.tensor(keep, device=device)[:, None] * beams + torch.arange(beams, device=device)).view(-1)
            state.select(rows)
            history, scores, tokens = history[rows], scores[rows], tokens[rows]
            images, done = [images[g] for g in keep], [False] * len(keep)
    # max_length reached: the live beams end with a forced EOT
    contents, sums = history[:, 1: options.max_length - 1].tolist(), scores.tolist()
    for row, (content, total) in enumerate(zip(contents, sums)):
        if not done[row // beams]:
            pools.add(images[row // beams], total, content)
    return [pools.best(i) for i in range(n_images)]


def _collect_finished(pools: _BeamPools, images: list[int], done: list[bool], history: torch.Tensor,
                      ends: torch.Tensor, cand_scores: torch.Tensor, cand_beam: torch.Tensor, t: int,
                      beams: int) -> None:
    """Move ending candidates (ends: (G, beams) bool over the top ranks) into their image's pool."""
    hits = ends.nonzero().tolist()
    if not hits:
        return
    group_rank = torch.tensor(hits, device=cand_beam.device)  # (n, 2)
    g, r = group_rank[:, 0], group_rank[:, 1]
    rows = g * beams + cand_beam[g, r]
    contents = history[rows, 1: t + 1].tolist()  # positions 1..t; the ending token is not content
    for (group, _), total, content in zip(hits, cand_scores[g, r].tolist(), contents):
        if not done[group]:
            pools.add(images[group], total, content)


def content_tokens(sequence: list[int], eot_id: int = EOT_ID, pad_id: int = PAD_ID) -> list[int]:
    """A decoded sequence (SOT first, e.g. a row of open_clip's ``generate``) cut to its caption:
    the tokens after SOT up to, not including, the first EOT or pad."""
    body = sequence[1:]
    for i, token in enumerate(body):
        if token == eot_id or token == pad_id:
            return body[:i]
    return body


def generate_tokens(model: nn.Module, images: torch.Tensor, options: DecodingOptions, *, sot_id: int = SOT_ID,
                    eot_id: int = EOT_ID, pad_id: int = PAD_ID) -> list[list[int]]:
    """Caption token ids for each image, without SOT and without the EOT/pad that ends it.

    Args:
        model: an open_clip ``CoCa`` with the default (non-HF, non-custom-block) text towers.
            Decoded in eval mode; its training flag is restored afterwards.
        images: (B, 3, H, W) preprocessed, on the model's device and in its dtype.
        options: see ``DecodingOptions``; ``max_length`` must fit both towers' context length.
        sot_id / eot_id / pad_id: the tokenizer's (default: open_clip's BPE). A generated pad ends
            a caption as in open_clip (the text tower's own pad mask uses ``model.text.pad_id``).
    Returns:
        B lists of ints, each at most ``max_length - 2`` long.
    """
    options.validate()
    text, decoder = _check_supported(model)
    vocab_size = decoder.text_projection.shape[1]
    if max(sot_id, eot_id, pad_id) >= vocab_size:
        raise ValueError(f"token ids sot={sot_id}, eot={eot_id}, pad={pad_id} are outside the model's "
                         f"{vocab_size}-token vocabulary: pass its tokenizer's (CaptionerTokenizer.generation_ids())")
    limit = min(text.context_length, decoder.context_length)
    if options.max_length > limit:
        raise ValueError(f"DecodingOptions.max_length={options.max_length} exceeds the model's context length "
                         f"({limit}); lower it")
    was_training = model.training
    model.eval()  # open_clip's generate does the same: no patch dropout in the visual tower
    try:
        with torch.inference_mode():
            _, image_embs = model._encode_image(images)  # (B, N, W), once per image
            if not isinstance(image_embs, torch.Tensor) or image_embs.ndim != 3:
                raise NotImplementedError("the visual tower must return its tokens (vision_cfg output_tokens=True)")
            state = _DecoderState(model, image_embs, capacity=options.max_length - 2)
            if options.strategy == "beam":
                return _decode_beams(state, options, sot_id, eot_id, pad_id)
            sequences = _decode_rows(state, options, sot_id, eot_id, pad_id).tolist()
    finally:
        model.train(was_training)
    return [content_tokens(sequence, eot_id, pad_id) for sequence in sequences]


def decode_text(token_ids: list[int], tokenizer) -> str:
    """Caption text from ids with the captioner's tokenizer (a ``CaptionerTokenizer``, or open_clip's
    ``SimpleTokenizer``); special tokens and edge spaces removed."""
    special = set(tokenizer.all_special_ids)
    return tokenizer.decode([token for token in token_ids if token not in special]).strip()
