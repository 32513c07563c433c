"""The ``token_classification`` task: one tag per word (NER, POS), a head on every token's features."""

import functools

from graft import UNLABELLED, Task, hookimpl
from graft.supervised import (ENTITY_PREFIXES, check_class_ids, confusion_metrics, confusion_sums, entity_counts,
                              flatten_dense, tag_words)


class TokenClassification(Task):
    """One tag per word: a head on every token's features; token accuracy, and entity F1 for BIO / BIOES tags."""

    features = "tokens"
    losses = ("cross_entropy",)
    metric_modes = {"accuracy": "max", "macro_f1": "max", "entity_f1": "max", "entity_precision": "max",
                    "entity_recall": "max"}
    per_target = True
    distillable = True
    output_shape = "[batch, tokens, tags]"

    @functools.cached_property
    def entities(self) -> bool:
        """Tags of an entity scheme (B-PER, I-PER, O ...): entity-level metrics besides token accuracy."""
        return any(str(n).startswith(ENTITY_PREFIXES) for n in self.label_names)

    def metric(self):
        return "entity_f1" if self.entities else None

    def check_targets(self, targets):
        check_class_ids(targets, self.data, self.name)

    def loss_inputs(self, outputs, targets):
        return flatten_dense(outputs, targets)

    def eval_sums(self, outputs, targets):
        import torch

        pred = outputs.argmax(-1)  # [B, T]
        sums = confusion_sums(pred, targets, outputs.shape[-1])
        if self.entities:  # per sentence: the tags of the words (their first pieces), in order
            names, pred, y = self.label_names, pred.cpu(), targets.cpu()  # one copy per batch
            rows = [(y[b][y[b] != UNLABELLED].tolist(), pred[b][y[b] != UNLABELLED].tolist()) for b in range(len(y))]
            counts = entity_counts([[names[i] for i in g] for g, _ in rows], [[names[i] for i in p] for _, p in rows])
            sums["entities"] = torch.tensor(counts, dtype=torch.float64)
        return sums

    def compute_metrics(self, sums):
        m = {}
        if "entities" in sums:
            tp, n_pred, n_gold = (float(x) for x in sums["entities"])
            m["entity_precision"], m["entity_recall"] = tp / max(n_pred, 1), tp / max(n_gold, 1)
            m["entity_f1"] = 2 * tp / max(n_pred + n_gold, 1)
        return {**m, **confusion_metrics(sums, self.label_names)}

    def distill_logits(self, student, teacher, targets):
        s, y = flatten_dense(student, targets)
        return s, flatten_dense(teacher, targets)[0], y

    def predict(self, model, inputs):
        return tag_words(model, inputs, self.label_names)

    def show(self, result, item, out_dir):
        # every word as the data source split it, with its tag (a word past max_length has none: bare)
        return result, " ".join(w if t is None else f"{w}/{t}" for w, t in zip(item.split(), result["tags"]))


@hookimpl
def register_tasks(register):
    register(TokenClassification, name="token_classification")
