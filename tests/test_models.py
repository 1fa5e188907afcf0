import pytest
import torch
import torch.nn.functional as F

from advmnist.errors import ModelError
from advmnist.models import Normalize, Recipe, create_model, list_models, register_model

DOCUMENTED = ["mlp", "cnn-small", "tutorial", "textbook", "improved-bn", "cnn-deep", "two-conv", "lenet",
              "lenet-bn"]


def test_zoo_holds_every_documented_model():
    assert set(DOCUMENTED) <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_gives_logits_and_normalisation_is_the_first_layer(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert isinstance(next(iter(model.children())), Normalize)
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert not torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-3), "outputs must be logits"


@pytest.mark.parametrize("name", list_models())
def test_a_few_steps_reduce_the_loss_and_every_parameter_learns(name, small):
    torch.manual_seed(0)
    model = create_model(name).train()
    x, y = small.train_x[:256], small.train_y[:256]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for step in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first = loss.item()
            for pname, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{pname} gets no gradient"
        opt.step()
    assert loss.item() < 0.7 * first


def test_unknown_model_and_bad_option():
    with pytest.raises(ModelError, match="unknown model 'resnet'"):
        create_model("resnet")
    with pytest.raises(ModelError, match="takes no option 'dropout'"):
        create_model("lenet", dropout=0.1)
    with pytest.raises(ModelError, match="dropout must be in"):
        create_model("improved-bn", dropout=1.5)


def test_dropout_option_adds_dropout2d_to_textbook_nets():
    model = create_model("improved-bn", dropout=0.1)
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3


def test_register_model_refuses_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        @register_model(report="x", recipe=Recipe(), accuracy=0)
        def mlp():
            return torch.nn.Identity()


def test_whole_map_conv_equals_the_convolution():
    from advmnist.models import WholeMapConv2d

    torch.manual_seed(0)
    conv = WholeMapConv2d(50, 500, 4)
    x = torch.randn(7, 50, 4, 4, requires_grad=True)
    fast = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias)
    assert fast.shape == ref.shape == (7, 500, 1, 1)
    assert torch.allclose(fast, ref, atol=1e-5)
    g_fast, = torch.autograd.grad(fast.square().sum(), x)
    g_ref, = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g_fast, g_ref, atol=1e-4)
    bigger = torch.randn(2, 50, 6, 6)
    assert torch.allclose(conv(bigger), F.conv2d(bigger, conv.weight, conv.bias), atol=1e-5)
