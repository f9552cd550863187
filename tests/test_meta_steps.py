"""MAML.meta_steps (ops.maml_mlp_meta_steps_: a stack of meta-batches' meta-steps in one call) against two oracles:
an explicit per-task loop with torch.autograd.grad and torch.optim.Adam, and meta_step called once per batch (the
documented equivalence, to the bit); its fallbacks, its errors, and the BatchStack it takes as it is."""
import pytest
import torch
import torch.nn.functional as F

import metalearn_fast as mf
from metalearn_fast import MAML, MLP, BatchStack, SinusoidTasks, TaskBatch, ops, reference
from metalearn_fast.algorithms import maml as maml_module
from conftest import forced_cpu_simd
from test_fused_meta_step import OPCHECK_TESTS, VARIANTS, batches, learner

SINE_SIZES = [1, 40, 40, 1]


def sine_learner(dtype, inner_steps=1):
    torch.manual_seed(0)
    maml = MAML(MLP(SINE_SIZES, dtype=dtype), inner_lr=0.01, inner_steps=inner_steps, loss="mse")
    return maml, torch.optim.Adam(maml.parameters(), lr=1e-2)


def per_task_loop_steps(params, stack, inner_lr, inner_steps, lr):
    """The oracle: each meta-step a Python loop over the tasks, each adapted with torch.autograd.grad (second
    order), the mean query loss backward, then torch.optim.Adam's step."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for batch in stack:
        optimizer.zero_grad()
        total = 0
        for t in range(batch.num_tasks):
            fast = params
            for _ in range(inner_steps):
                support = F.mse_loss(reference.mlp_forward(batch.x_support[t], fast), batch.y_support[t])
                grads = torch.autograd.grad(support, fast, create_graph=True)
                fast = [p - inner_lr * g for p, g in zip(fast, grads)]
            total = total + F.mse_loss(reference.mlp_forward(batch.x_query[t], fast), batch.y_query[t])
        loss = total / batch.num_tasks
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("level", ["none", "avx2", "avx512"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_steps_match_a_per_task_loop_with_torch_adam(level, inner_steps):
    """Ten sinusoid meta-steps on a BatchStack as SinusoidTasks draws it (each set a strided view of one draw), in
    float64, at each instruction set of the CPU kernels ("none": the meta-steps in turn through the dispatcher)."""
    stack = SinusoidTasks(seed=3).sample_many(10, 5, dtype=torch.float64)
    assert isinstance(stack, BatchStack) and not stack.stacked("x_support").is_contiguous()
    maml, optimizer = sine_learner(torch.float64, inner_steps)
    params = [p.detach().clone().requires_grad_() for p in maml.parameters()]
    expected = per_task_loop_steps(params, stack, 0.01, inner_steps, lr=1e-2)
    with forced_cpu_simd(level):
        got = maml.meta_steps(stack, optimizer)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for p, q in zip(maml.parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(params[0], next(sine_learner(torch.float64)[0].parameters()))  # the steps moved it


def assert_same_training(a, a_optimizer, b, b_optimizer):
    """Parameters, .grad and optimizer state equal to the bit."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), f"{name}.grad"
    expected, got = a_optimizer.state_dict()["state"], b_optimizer.state_dict()["state"]
    assert got.keys() == expected.keys()
    for index, state in expected.items():
        for key, value in state.items():
            assert torch.equal(got[index][key], value), f"state {index} {key}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_meta_steps_leave_what_meta_step_per_batch_leaves(variant, loss, dtype):
    """The documented equivalence, to the bit, for MAML (Adam), FOMAML (SGD with Nesterov momentum), Meta-SGD (AdamW),
    ANIL (SGD with momentum and dampening: the momentum buffers hold a history from the second step on) and MAML++
    (whose schedule changes between steps: meta_step per batch), 2 inner steps, a list of 30 batches."""
    listed = list(batches(loss, dtype))[:30]
    one_by_one, one_optimizer = learner(variant, 2, loss, dtype)
    stacked, stacked_optimizer = learner(variant, 2, loss, dtype)
    expected = torch.stack([one_by_one.meta_step(batch, one_optimizer) for batch in listed])
    got = stacked.meta_steps(listed, stacked_optimizer)
    assert got.shape == (30,) and torch.equal(got, expected)
    assert_same_training(one_by_one, one_optimizer, stacked, stacked_optimizer)
    if variant == "maml++":
        assert stacked.plus.taken == one_by_one.plus.taken == 30


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_stacks_of_any_layout(level):
    """A stack read in place (BatchStack views), one whose meta-batches are not contiguous blocks (stacked along the
    tasks, then transposed: copied whole once) and a list (stacked first) leave what meta_step per batch leaves."""
    stack = SinusoidTasks(seed=1).sample_many(6, 4, dtype=torch.float64)
    sets = [stack.stacked(name) for name in ("x_support", "y_support", "x_query", "y_query")]
    transposed = [torch.stack(list(t.unbind(0)), 1).transpose(0, 1) for t in sets]
    assert not transposed[0].select(0, 0).is_contiguous() or transposed[0].stride(0) < transposed[0].stride(1)
    layouts = {"stack": stack, "transposed": BatchStack(TaskBatch, transposed), "list": list(stack)}
    with forced_cpu_simd(level):
        reference_maml, reference_optimizer = sine_learner(torch.float64)
        expected = torch.stack([reference_maml.meta_step(b, reference_optimizer) for b in stack])
        for name, layout in layouts.items():
            maml, optimizer = sine_learner(torch.float64)
            assert torch.equal(maml.meta_steps(layout, optimizer), expected), name
            assert_same_training(reference_maml, reference_optimizer, maml, optimizer)


def test_what_one_call_cannot_take_runs_meta_step_per_batch(monkeypatch):
    """Batches of different shapes, and a model off the fused path, train as meta_step per batch would; an empty list
    changes nothing."""
    calls = []
    original = MAML.meta_step
    monkeypatch.setattr(MAML, "meta_step", lambda self, batch, opt: calls.append(1) or original(self, batch, opt))
    stack = SinusoidTasks(seed=2).sample_many(3, 4, dtype=torch.float64)
    mixed = [*stack, SinusoidTasks(seed=2, k_support=7).sample(4, dtype=torch.float64)]
    maml, optimizer = sine_learner(torch.float64)
    assert maml.meta_steps(mixed, optimizer).shape == (4,) and len(calls) == 4
    calls.clear()
    custom = MAML(MLP(SINE_SIZES, dtype=torch.float64), loss=lambda p, t: (p - t).abs().flatten(1).mean(1))
    assert custom.meta_steps(stack, torch.optim.Adam(custom.parameters())).shape == (3,) and len(calls) == 3
    calls.clear()
    before = [p.detach().clone() for p in maml.parameters()]
    empty = maml.meta_steps([], optimizer)
    assert empty.shape == (0,) and not calls and all(torch.equal(a, b) for a, b in zip(before, maml.parameters()))


def test_bad_arguments_are_named_and_change_nothing():
    maml, optimizer = sine_learner(torch.float64)
    stack = SinusoidTasks(seed=2).sample_many(3, 4, dtype=torch.float64)
    before = [p.detach().clone() for p in maml.parameters()]
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        maml.meta_steps(stack, "adam")
    with pytest.raises(TypeError, match=r"batches\[1\] must be a metalearn_fast.TaskBatch, got tuple"):
        maml.meta_steps([stack[0], (1, 2)], optimizer)
    with pytest.raises(TypeError, match="x_support must have the model's dtype torch.float64"):
        maml.meta_steps(SinusoidTasks(seed=2).sample_many(3, 4), optimizer)
    # a label out of range in the last batch: found before the first step
    classifier, classifier_optimizer = learner("maml", 1, "cross_entropy", torch.float32)
    listed = list(batches("cross_entropy", torch.float32))[:3]
    labels = listed[2].y_query.clone()
    labels[0, 0] = 7
    listed[2] = TaskBatch(listed[2].x_support, listed[2].y_support, listed[2].x_query, labels)
    classifier_before = [p.detach().clone() for p in classifier.parameters()]
    with pytest.raises(ValueError, match="y_query holds class label 7 but the model has 2 outputs"):
        classifier.meta_steps(listed, classifier_optimizer)
    for b, p in [*zip(before, maml.parameters()), *zip(classifier_before, classifier.parameters())]:
        assert torch.equal(b, p)


def op_arguments(loss="mse", steps=4, dtype=torch.float64, variant="meta-sgd"):
    """maml_mlp_meta_steps_'s arguments: a stack of `steps` meta-batches, Meta-SGD's learned rates."""
    maml, optimizer = learner(variant, 2, loss, dtype)
    update = maml_module._fused_update(maml, optimizer)
    params = [p.detach() for p in maml.model.parameters()]
    learned = [r.detach() for r in maml_module._learned_rates(maml)]
    grads, state, settings = update.arguments()
    listed = list(batches(loss, dtype))[:steps]
    sets = [torch.stack([getattr(b, name) for b in listed]) for name in ("x_support", "y_support", "x_query",
                                                                           "y_query")]
    return (params, learned or [torch.tensor(0.1, dtype=dtype)], grads, state, *sets, 2, maml.first_order, loss,
            maml._first_adapted_layer, bool(learned), update.kind, settings, *maml_module._per_step(maml))


@pytest.mark.parametrize("variant", ["meta-sgd", "anil"])
def test_opcheck_meta_steps(variant):
    torch.library.opcheck(torch.ops.metalearn_fast.maml_mlp_meta_steps_.default, op_arguments(variant=variant),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_the_compiled_op_matches_the_reference_op(loss):
    results = []
    for op in (ops.maml_mlp_meta_steps_, reference.maml_mlp_meta_steps_):
        arguments = op_arguments(loss)
        with torch.no_grad():
            losses = op(*arguments)
        results.append([losses] + [t.clone() for t in (*arguments[0], *arguments[1], *arguments[2], *arguments[3])])
    assert results[0][0].shape == (4,)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", [ops.maml_mlp_meta_steps_, reference.maml_mlp_meta_steps_], ids=["op", "reference"])
def test_the_op_names_a_bad_stack_and_a_later_bad_label_before_any_step(op):
    arguments = list(op_arguments("cross_entropy"))
    before = [t.clone() for t in arguments[0]]
    short = list(arguments)
    short[7] = arguments[7][:3]
    with pytest.raises(ValueError, match="y_query must stack S = 4 meta-batches like x_support"):
        op(*short)
    empty = list(arguments)
    empty[4:8] = [t[:0] for t in arguments[4:8]]
    with pytest.raises(ValueError, match="S >= 1 meta-batches stacked"):
        op(*empty)
    labels = arguments[7].clone()
    labels[3, 0, 0] = 9
    late = list(arguments)
    late[7] = labels
    with pytest.raises(ValueError, match=r"y_query must hold class labels in \[0, 2\), got labels from 0 to 9"):
        op(*late)
    for b, p in zip(before, arguments[0]):
        assert torch.equal(b, p)


@pytest.mark.skipif(ops._extension is None, reason="the extension's unboxed entry point")
def test_the_unboxed_entry_names_a_wrong_argument():
    arguments = list(op_arguments())
    wrong = list(arguments)
    wrong[6] = 3.0
    with pytest.raises(TypeError, match=r"maml_mlp_meta_steps_: argument 6 \(x_query\) must be a tensor"):
        ops._extension.maml_mlp_meta_steps_(*wrong)
    with pytest.raises(TypeError, match="maml_mlp_meta_steps_: expected 17 arguments, got 16"):
        ops._extension.maml_mlp_meta_steps_(*arguments[:16])


def test_a_batch_stack_is_the_sequence_of_its_batches():
    """Indexing, negative indexing, slicing and iteration give the batches that sample() draws one by one."""
    stack = SinusoidTasks(seed=4).sample_many(5, 3)
    single = SinusoidTasks(seed=4)
    one_by_one = [single.sample(3) for _ in range(5)]
    assert len(stack) == 5 and len(stack[1:4]) == 3 and isinstance(stack[1:4], BatchStack)
    pairs = [*zip(stack, one_by_one), (stack[-1], one_by_one[4]), *zip(stack[1:4], one_by_one[1:4])]
    for got, expected in pairs:
        assert type(got) is type(expected)
        for name in ("x_support", "y_support", "x_query", "y_query", "amplitude", "phase"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert torch.equal(stack.stacked("y_query")[2], one_by_one[2].y_query)
    with pytest.raises(IndexError):
        stack[5]
    assert mf.BatchStack is BatchStack


def test_a_batch_stack_made_by_hand_is_checked_as_a_batch_is():
    """BatchStack(batch_type, fields) runs batch_type's checks on all its batches (a sampler's is not checked):
    NaN in a later batch, stacks of different counts, a wrong field count, and the labels' bounds it keeps."""
    listed = list(batches("cross_entropy", torch.float32))[:3]
    names = ("x_support", "y_support", "x_query", "y_query")
    fields = [torch.stack([getattr(b, name) for b in listed]) for name in names]
    stack = BatchStack(TaskBatch, fields)
    assert len(stack) == 3 and stack.largest_labels == (1, 1) and torch.equal(stack[2].y_query, listed[2].y_query)
    bad = [t.clone() for t in fields]
    bad[2][2, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_query contains NaN"):
        BatchStack(TaskBatch, bad)
    with pytest.raises(ValueError, match=r"y_query must be a tensor \[count, T, ...\] with the count of x_support's"):
        BatchStack(TaskBatch, fields[:3] + [fields[3][:2]])
    with pytest.raises(ValueError, match="fields must hold one stack per field of TaskBatch"):
        BatchStack(TaskBatch, fields[:3])
    with pytest.raises(TypeError, match="batch_type must be TaskBatch or a subclass"):
        BatchStack(dict, fields)
    labels = fields[3].clone()
    labels[1, 0, 0] = 5
    wide = BatchStack(TaskBatch, fields[:3] + [labels])
    assert wide.largest_labels == (1, 5) and wide[0].largest_labels == (1, 5)
    maml, optimizer = learner("maml", 1, "cross_entropy", torch.float32)
    with pytest.raises(ValueError, match="y_query holds class label 5 but the model has 2 outputs"):
        maml.meta_steps(wide, optimizer)
