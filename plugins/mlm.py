"""The ``mlm`` strategy: masked-language-model training of a Hugging Face text backbone.

Continued pretraining of a pretrained text model, or pretraining from scratch (with a random-init ``hf`` backbone
the ``corpus`` source trains a WordPiece tokenizer). Masking follows BERT (Devlin et al., 2019): 15% of tokens
chosen, of those 80% masked, 10% random, 10% kept; optionally whole words. The adapted backbone is exported like any
run's, so ``[backbone] weights = "runs/<mlm-run>"`` hands it to a fine-tune or distill run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graft import GraftError, Strategy, hookimpl, option
from graft.capabilities import TaskModel, require


# -- masking --------------------------------------------------------------------------------------------
def mask_tokens(input_ids, maskable, mask_id: int, vocab_size: int, mlm_probability=0.15, mask_ratio=0.8,
                random_ratio=0.1, word_ids=None, generator=None):
    """Dynamic MLM masking. Returns (inputs, labels); labels are -100 where nothing is predicted.

    ``maskable`` is False for special and padding tokens, which are never chosen. Of the chosen positions,
    ``mask_ratio`` become the mask token, ``random_ratio`` a random token, the rest stay. With ``word_ids``
    (one id per token, unique within the row, -1 for none) whole words are chosen together, and all tokens of a
    word get the same one of the three treatments, so the split holds for words and tokens alike.
    """
    import torch

    device = input_ids.device
    rand = lambda shape: torch.rand(shape, device=device, generator=generator)  # noqa: E731
    if word_ids is None:
        chosen = (rand(input_ids.shape) < mlm_probability) & maskable
        u = rand(input_ids.shape)
    else:
        # One draw per word: gather each token's word draw. Word ids index a per-row table of draws.
        w = word_ids.clamp(min=0)
        n_words = int(w.max().item()) + 1 if w.numel() else 1
        draws = rand((input_ids.shape[0], n_words))
        kinds = rand((input_ids.shape[0], n_words))
        chosen = (draws.gather(1, w) < mlm_probability) & maskable & (word_ids >= 0)
        u = kinds.gather(1, w)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    inputs = input_ids.clone()
    to_mask = chosen & (u < mask_ratio)
    to_random = chosen & (u >= mask_ratio) & (u < mask_ratio + random_ratio)
    inputs[to_mask] = mask_id
    random_tokens = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    inputs[to_random] = random_tokens[to_random]
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

        ids, maskable, words = batch["inputs"]["input_ids"], batch["maskable"], batch["word_ids"]
        o, rows = self.options, []
        for r, index in enumerate(batch["index"].tolist()):
            g = torch.Generator(device=ids.device).manual_seed(self.data.example_seed(index))
            rows.append(mask_tokens(ids[r:r + 1], maskable[r:r + 1], self.mask_id, self.vocab_size,
                                    o.mlm_probability, o.mask_ratio, o.random_ratio,
                                    word_ids=words[r:r + 1] if o.whole_word else None, generator=g))
        return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])

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
