import pytest
import torch
from torch import nn
from tiny import D, D_MLP, FAMILIES, LAYERS, tiny_model

from factedit.arch import ArchitectureError, linear_dims, map_architecture
from factedit.hooks import Hook


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_map_finds_every_part(family):
    model = tiny_model(family)
    arch = map_architecture(model)
    assert arch.n_layers == LAYERS and arch.d_model == D and arch.d_mlp == D_MLP
    assert arch.embed is model.get_input_embeddings() and arch.unembed is model.get_output_embeddings()
    assert arch.final_norm is not None
    for parts in arch.blocks:
        assert linear_dims(parts.mlp_out) == (D_MLP, D)
        assert linear_dims(parts.attn_out)[1] == D
        assert parts.mlp_out is not parts.attn_out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mapped_modules_carry_the_computation(family):
    """The MLP output projection's input is the key (d_mlp wide); zeroing its output, or the attention
    output, changes the model's prediction: both really are on the residual path."""
    model = tiny_model(family)
    arch = map_architecture(model)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        base = model(ids).logits
        with Hook(arch.blocks[1].mlp_out, keep_input=True) as h:
            model(ids)
        assert h.input.shape[-1] == D_MLP and h.input.numel() == 5 * D_MLP
        for module in (arch.blocks[1].mlp_out, arch.blocks[1].attn_out):
            with Hook(module, edit_output=torch.zeros_like):
                changed = model(ids).logits
            assert not torch.allclose(base, changed)


def test_unsupported_models_name_the_missing_part():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10)

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.out

    with pytest.raises(ArchitectureError, match="blocks"):
        map_architecture(NoBlocks())

    class NoMlp(NoBlocks):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(2)])

    with pytest.raises(ArchitectureError, match="MLP"):
        map_architecture(NoMlp())

    class NoHead(nn.Module):
        def get_input_embeddings(self):
            return nn.Embedding(3, 2)

        def get_output_embeddings(self):
            return None

    with pytest.raises(ArchitectureError, match="unembedding"):
        map_architecture(NoHead())
