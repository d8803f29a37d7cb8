"""Prefix tuning through `peft`: trainable key/value prefixes in every attention layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021.
Trainable: a prefix of num_virtual_tokens (default 10, the paper's
table-to-text setting) keys and values for every layer, produced during
training by the paper's reparametrisation P = MLP(P'), where P' is a small
embedding (num_virtual_tokens x hidden_size) and the MLP has one tanh hidden
layer of 512 units (the width of the authors' code); all of P', the MLP and
the task head are trained and counted. Not back-propagated through: nothing is
skipped; the gradient reaches the prefixes through the frozen attention of
every layer above.

Departures from the paper: the paper generates text with GPT-2/BART; here the
encoder feeds a freshly initialised classification head, which is trained.
The paper's lr 5e-5 (with batch size 5) was for generation with GPT-2; for
classification with this small encoder the default is 1e-3, a documented
choice (P-tuning v2, which applies the same deep prefixes to BERT-style
encoders for NLU, uses 5e-3 to 1e-2 without the reparametrising MLP).
"""

from methods._peft import PeftMethod, head_names


class PrefixTuning(PeftMethod):
    name = "prefix_tuning"
    family = "PETL"
    description = "prefix tuning (peft): trainable key/value prefixes in every layer via an MLP, head trained"
    paper = "Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, ACL 2021"
    trains = "prefix embedding + reparametrising MLP + head"
    default_lr = 1e-3
    defaults = {"num_virtual_tokens": 10, "projection": True, "projection_hidden": 512}

    def check_hparams(self):
        if self.hparams["num_virtual_tokens"] < 1 or self.hparams["projection_hidden"] < 1:
            raise ValueError("num_virtual_tokens and projection_hidden must be at least 1")

    def peft_config(self, model, task):
        from peft import PrefixTuningConfig, TaskType
        return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.hparams["num_virtual_tokens"],
                                  prefix_projection=self.hparams["projection"],
                                  encoder_hidden_size=self.hparams["projection_hidden"], modules_to_save=head_names(model))

    def adapter_params(self, model, task):
        n, d, layers = self.hparams["num_virtual_tokens"], model.config.hidden_size, model.config.num_hidden_layers
        prefix = layers * 2 * d  # a key and a value vector per layer, for each virtual token
        if not self.hparams["projection"]:
            return n * prefix
        h = self.hparams["projection_hidden"]
        return n * d + (d * h + h) + (h * prefix + prefix)
