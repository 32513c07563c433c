"""The ``mlm`` strategy: masked-language-model training of a Hugging Face text backbone.

Continued pretraining of a pretrained text model, or pretraining from scratch (with a random-init ``hf`` backbone
the ``corpus`` source trains a WordPiece tokenizer). Masking follows BERT (Devlin et al., 2019): 15% of tokens
chosen, of those 80% masked, 10% random, 10% kept; optionally whole words. The adapted backbone is exported like any
run's, so ``[backbone] weights = "runs/<mlm-run>"`` hands it to a fine-tune or distill run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from graft import GraftError, Strategy, hookimpl, option
from graft.capabilities import TaskModel, require


# -- masking --------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: spreads consecutive counters over the 32-bit range


def _counter_draws(seeds, counters):
    """Random 32-bit integers ``[B, N]`` (int64) as a pure function of (``seeds[b]``, ``counters[b, n]``): a
    counter-based generator (the idea of Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2, 3"), so one
    example's draws do not depend on the other rows of its batch, and a whole batch is drawn in a dozen tensor
    operations. The mix is the "0x45d9f3b" 32-bit integer finaliser (T. Mueller): every output bit depends on every
    input bit; its products stay below 2^59, so int64 never overflows. In place: at [32, 128] an operation costs
    its dispatch (about 4 us here), not its arithmetic."""
    x = (seeds & _M32).unsqueeze(-1) + counters * _GOLDEN
    x &= _M32
    for _ in range(2):
        x ^= x >> 16
        x *= 0x45D9F3B
        x &= _M32
    x ^= x >> 16
    return x


@functools.lru_cache(maxsize=16)
def _positions(length: int, device: str):
    import torch

    return torch.arange(length, device=device)


def mask_tokens(input_ids, maskable, mask_id: int, vocab_size: int, mlm_probability=0.15, mask_ratio=0.8,
                random_ratio=0.1, word_ids=None, generator=None, seeds=None):
    """Dynamic MLM masking (BERT, Devlin et al., 2019). ``input_ids``/``maskable`` ``[B, L]``; returns (inputs,
    labels), both ``[B, L]`` int64; labels are -100 where nothing is predicted.

    ``maskable`` is False for special and padding tokens, which are never chosen. Of the chosen positions,
    ``mask_ratio`` become the mask token, ``random_ratio`` a random token, the rest stay. With ``word_ids``
    (one id per token, unique within the row, -1 for none) whole words are chosen together, and all tokens of a
    word get the same one of the three treatments, so the split holds for words and tokens alike.

    Draws: with ``seeds`` (``[B]`` int64, one per row) each row's masks are a function of its seed alone -- the same
    example is masked alike in any batch, with any accumulation or number of processes (graft's training path);
    otherwise from ``generator`` (or torch's global one). One uniform draw ``u`` per token (or word) decides all:
    chosen when ``u < p``, and since ``u / p`` is then uniform, masked when ``u < p * mask_ratio``, randomised in the
    next ``p * random_ratio``: one full-size draw where transformers' collator makes four.
    """
    import torch

    device = input_ids.device
    rows, length = input_ids.shape
    keys = word_ids.clamp(min=0) if word_ids is not None else None
    if seeds is not None:  # integer draws in [0, 2^32) against integer thresholds: no float copy
        counters = keys if keys is not None else _positions(length, str(device))
        u, scale = _counter_draws(seeds.to(device), counters), lambda p: int(p * 2 ** 32)
    else:
        if keys is not None:
            n_words = int(keys.max()) + 1 if keys.numel() else 1
            u = torch.rand((rows, n_words), device=device, generator=generator).gather(1, keys)
        else:
            u = torch.rand(input_ids.shape, device=device, generator=generator)
        scale = float
    if word_ids is not None:
        maskable = maskable & (word_ids >= 0)
    p_chosen, p_mask = scale(mlm_probability), scale(mlm_probability * mask_ratio)
    p_random = scale(mlm_probability * (mask_ratio + random_ratio))
    labels = torch.where((u < p_chosen) & maskable, input_ids, -100)
    inputs = input_ids.masked_fill((u < p_mask) & maskable, mask_id)
    r, c = ((u >= p_mask) & (u < p_random) & maskable).nonzero(as_tuple=True)
    if len(r):
        if seeds is not None:
            # The draw that chose a token also names its replacement: given u in the "random" band (over 2^32 * p *
            # random_ratio ~ 6e7 values at the defaults), the 32-bit draw modulo the vocabulary is uniform to within
            # vocabulary / band size (0.4% for 250k tokens); xor-ing in the position keeps the pieces of one word
            # (which share a draw) from all becoming the same token.
            tokens = (u[r, c] ^ (c * _GOLDEN & _M32)) % vocab_size
        else:
            tokens = torch.randint(vocab_size, (len(r),), device=device, generator=generator)
        inputs[r, c] = tokens.to(inputs.dtype)
    return inputs, labels


# -- the strategy -----------------------------------------------------------------------------------------
@dataclass
class MLMOptions:
    mlm_probability: float = option(0.15, "Share of (non-special) tokens chosen for prediction (as in transformers' "
                                          "DataCollatorForLanguageModeling).")
    mask_ratio: float = option(0.8, "Of the chosen tokens: share replaced by the mask token.")
    random_ratio: float = option(0.1, "Of the chosen tokens: share replaced by a random token (the rest stay).")
    whole_word: bool = option(False, "Choose whole words (from the fast tokenizer's word ids), not single tokens.")

    def validate(self):
        if not 0 < self.mlm_probability < 1 or self.mask_ratio < 0 or self.random_ratio < 0 \
                or self.mask_ratio + self.random_ratio > 1:
            raise ValueError("need 0 < mlm_probability < 1 and mask_ratio + random_ratio <= 1.")


class MLM(Strategy):
    """Masked-language-model training of an hf backbone (continued pretraining or from scratch); reports perplexity."""

    Options = MLMOptions
    primary_metric = "perplexity"
    supports_adapters = True
    metric_modes = {"loss": "min", "perplexity": "min", "masked_accuracy": "max"}

    def build(self):
        if self.data.task != "mlm":
            raise GraftError("[strategy] plugin = \"mlm\" needs [data] plugin = \"corpus\" (unlabelled text).")
        self.model = require(self.backbone, TaskModel, "[strategy] plugin = \"mlm\"",
                             "Use an hf text backbone.").task_model("masked-lm")
        self.mask_id = self.backbone.tokenizer().mask_token_id  # the corpus gave a random-init backbone its own
        if self.mask_id is None:
            raise GraftError("[strategy] plugin = \"mlm\": the tokenizer has no mask token, so it cannot do masked-LM "
                             "(a decoder's tokenizer? train it with plugin = \"clm\").")
        self.vocab_size = self.model.config.vocab_size
        return self.model

    def param_groups(self, model):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0, "name": "all"}]

    def _masked(self, batch, generator=None):
        o = self.options
        return mask_tokens(batch["inputs"]["input_ids"], batch["maskable"], self.mask_id, self.vocab_size,
                           o.mlm_probability, o.mask_ratio, o.random_ratio,
                           word_ids=batch["word_ids"] if o.whole_word else None, generator=generator)

    def _predict_masked(self, model, batch, generator=None, masks=None):
        """(logits, labels, summed cross-entropy over the masked tokens) for ``masks`` ((inputs, labels)), or for
        masks freshly drawn from ``generator``."""
        import torch

        inputs, labels = masks if masks is not None else self._masked(batch, generator=generator)
        logits = model(input_ids=inputs, attention_mask=batch["inputs"]["attention_mask"]).logits.float()
        loss_sum = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                                     ignore_index=-100, reduction="sum")
        return logits, labels, loss_sum

    def training_masks(self, batch):
        """(inputs, labels) with each example's masks drawn from its own seed (``data.example_seed`` of its index:
        seed, epoch, example), so an example is masked alike with any batch size, accumulation or number of
        processes, and after a resume."""
        import torch

        o = self.options
        seeds = torch.tensor([self.data.example_seed(i) for i in batch["index"].tolist()], dtype=torch.int64)
        return mask_tokens(batch["inputs"]["input_ids"], batch["maskable"], self.mask_id, self.vocab_size,
                           o.mlm_probability, o.mask_ratio, o.random_ratio,
                           word_ids=batch["word_ids"] if o.whole_word else None, seeds=seeds)

    def step_targets(self, batch):
        batch["mlm_inputs"], batch["mlm_labels"] = self.training_masks(batch)
        return int((batch["mlm_labels"] != -100).sum())

    def training_step(self, model, batch):
        if "mlm_labels" not in batch:  # called outside the loop: masks of the usual random draw
            _, labels, loss_sum = self._predict_masked(model, batch)
            # Mean over masked tokens, and 0 (not NaN) for a batch where the draw masked none.
            return {"loss": loss_sum / (labels != -100).sum().clamp(min=1)}
        _, _, loss_sum = self._predict_masked(model, batch, masks=(batch["mlm_inputs"], batch["mlm_labels"]))
        return {"loss": loss_sum / batch["step_targets"]}

    def eval_step(self, model, batch):
        import torch

        # The same masks at every evaluation, so perplexities compare across steps and runs.
        g = torch.Generator(device=batch["index"].device).manual_seed(int(batch["index"][0]) + 1)
        logits, labels, loss_sum = self._predict_masked(model, batch, generator=g)
        masked = labels != -100
        return {"loss_sum": loss_sum, "tokens": masked.sum().float(),
                "correct": ((logits.argmax(-1) == labels) & masked).sum().float()}

    def compute_metrics(self, sums):
        import math

        loss = float(sums["loss_sum"]) / max(1.0, float(sums["tokens"]))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "masked_accuracy": float(sums["correct"]) / max(1.0, float(sums["tokens"]))}

    def export(self, model, directory):
        """backbone/ (save_pretrained base model + tokenizer: the hand-off) and mlm/ (the whole masked-LM model)."""
        Path(directory, "backbone").mkdir(exist_ok=True)
        self.backbone.export(str(Path(directory, "backbone")))
        self.model.save_pretrained(str(Path(directory, "mlm")), safe_serialization=True)
        self.backbone.tokenizer().save_pretrained(str(Path(directory, "mlm")))


@hookimpl
def register_strategies(register):
    register(MLM, name="mlm")
