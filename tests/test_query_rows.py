"""methods/_attention.QueryRows rebuilds a block from the roles harness.anatomy found: on every family it supports
(a tiny random model each), rows fed in as queries, reading the keys and values of the whole sequence, come out as
the backbone's own block outputs at those rows; the families it refuses say why."""

import pytest
import torch

from harness.anatomy import describe
from harness.families import BUILDERS
from methods._attention import QueryRows, rows_mask, unsupported
from methods._frozen import frozen_states, token_mask
from tests.conftest import toy_task
from tests.test_families import batch_for

REFUSED = {"deberta-v2", "deberta-v3"}  # disentangled attention computes its scores its own way


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_rows_run_apart_reproduce_the_blocks_own_outputs(family):
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    model.config.pad_token_id = 0
    anatomy = describe(model)
    reason = unsupported(anatomy)
    assert (reason is not None) == (family in REFUSED), reason
    if reason is not None:
        return
    batch = batch_for(family, toy_task())
    frozen = frozen_states(anatomy, batch)
    valid = token_mask(batch.get("attention_mask"), frozen.hidden[0]).bool()
    length = valid.shape[1]
    picked = torch.tensor([1, 3, 4])  # real tokens in every row of the batch
    positions = torch.arange(length).expand(valid.shape[0], -1)
    for block, call, h_in, h_out in zip(anatomy.blocks, frozen.calls, frozen.hidden[:-1], frozen.hidden[1:]):
        rotary = call.kwargs.get("position_embeddings")
        rows = QueryRows(anatomy, block)
        with torch.no_grad():
            keys, values = rows.keys_values(h_in, rotary)
            if anatomy.causal:
                mask = rows_mask(valid, len(picked), positions[:, picked], positions)
            else:
                mask = rows_mask(valid, len(picked))
            picked_rotary = None if rotary is None else tuple(t[:, picked] for t in rotary)
            out = rows(h_in[:, picked], keys, values, mask, picked_rotary)
        torch.testing.assert_close(out, h_out[:, picked], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(set(BUILDERS) - REFUSED))
def test_tokentune_training_forward_is_the_models_own_on_every_family(family):
    """The selected rows with a graph, the rest without: the forward output is still exactly the model's."""
    from methods.tokentune import TokenTune
    from tests.conftest import no_dropout

    torch.manual_seed(0)
    model = no_dropout(BUILDERS[family]())
    model.config.pad_token_id = 0
    batch = batch_for(family, toy_task())
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    tuned = TokenTune(fraction=0.3).apply(model, toy_task())
    tuned.train()
    logits = tuned(**batch).logits
    assert logits.requires_grad, "the training forward ran with a graph"
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
