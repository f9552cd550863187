"""The founding example: an MLP trained with Adam and MSE on one task, then trained further on a
new task. The only change from the plain-torch original is the import line below."""
import numpy as np

from metalearn_fast.compat import get_loss_fn, get_model, get_optimizer, learn_new_task, train

if __name__ == "__main__":
    np.random.seed(0)
    input_size, output_size = 10, 1
    x, y = np.random.rand(1000, input_size), np.random.rand(1000, output_size)

    model = get_model(input_size, output_size)
    optimizer = get_optimizer(model)
    loss_fn = get_loss_fn()
    losses = train(model, optimizer, loss_fn, x, y, epochs=10, batch_size=32)
    print("pretraining loss per epoch:", " ".join(f"{v:.4f}" for v in losses))

    new_x, new_y = np.random.rand(100, input_size), np.random.rand(100, output_size)
    learn_new_task(model, optimizer, loss_fn, new_x, new_y, epochs=5, batch_size=32)
    print("learned the new task")
