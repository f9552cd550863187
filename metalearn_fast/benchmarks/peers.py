"""The MAML meta-backward of the baselines the suites share: torch.func (vmap over tasks of an inner loop
written with grad and functional_call), and the peer libraries higher and learn2learn, one task at a time as
their documentation writes it. Each returns meta_backward(), which puts the meta-gradient in the model's .grad
and returns the meta-loss."""
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


def torch_func_meta_backward(net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor], inner_lr: float,
                             inner_steps: int, first_order: bool) -> Callable[[], Tensor]:
    params = dict(net.named_parameters())

    def loss_of(weights, x, y):
        return loss_fn(torch.func.functional_call(net, weights, (x,)), y)

    def adapted_query_loss(weights, x_support, y_support, x_query, y_query):
        for _ in range(inner_steps):
            grads = torch.func.grad(loss_of)(weights, x_support, y_support)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            weights = {name: w - inner_lr * grads[name] for name, w in weights.items()}
        return loss_of(weights, x_query, y_query)

    per_task = torch.func.vmap(adapted_query_loss, in_dims=(None, 0, 0, 0, 0))

    def meta_backward():
        loss = per_task(params, *batch).mean()
        loss.backward()
        return loss.detach()

    return meta_backward


def higher_meta_backward(net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor], inner_lr: float,
                         inner_steps: int, first_order: bool) -> Callable[[], Tensor]:
    import higher

    params = list(net.parameters())
    inner_optimizer = torch.optim.SGD(params, lr=inner_lr)
    tasks = batch[0].shape[0]

    def meta_backward():
        total = 0
        for x_support, y_support, x_query, y_query in zip(*batch):
            with higher.innerloop_ctx(net, inner_optimizer, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(loss_fn(fnet(x_support), y_support))
                loss = loss_fn(fnet(x_query), y_query) / tasks
                if first_order:  # the adapted weights are leaves: their gradient is the meta-gradient
                    for p, g in zip(params, torch.autograd.grad(loss, list(fnet.parameters()))):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    loss.backward()
            total = total + loss.detach()
        return total

    return meta_backward


def clone_adapt_meta_backward(meta_learner, loss_fn: Callable, batch: Sequence[Tensor],
                              inner_steps: int) -> Callable[[], Tensor]:
    """learn2learn's per-task loop, for any learner with its API (learn2learn's or metalearn_fast.l2l's MAML or
    MetaSGD): clone, adapt inner_steps times on the support set, backpropagate the query loss of each task."""
    tasks = batch[0].shape[0]

    def meta_backward():
        total = 0
        for x_support, y_support, x_query, y_query in zip(*batch):
            learner = meta_learner.clone()
            for _ in range(inner_steps):
                learner.adapt(loss_fn(learner(x_support), y_support))
            loss = loss_fn(learner(x_query), y_query) / tasks
            loss.backward()
            total = total + loss.detach()
        return total

    return meta_backward


def learn2learn_meta_backward(net: nn.Module, loss_fn: Callable, batch: Sequence[Tensor], inner_lr: float,
                              inner_steps: int, first_order: bool) -> Callable[[], Tensor]:
    import learn2learn

    maml = learn2learn.algorithms.MAML(net, lr=inner_lr, first_order=first_order)
    return clone_adapt_meta_backward(maml, loss_fn, batch, inner_steps)
