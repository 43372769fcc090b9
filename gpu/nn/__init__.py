"""Neural-network layers, optimizers and training on top of the `gpu` kernels.

A model is a `Sequential` of layers with explicit forward/backward; `mlp` builds the seed's
network (Linear -> BatchNorm -> activation per hidden layer, softmax cross-entropy head). Arrays
are NumPy or CuPy, as the data is: CuPy arrays run the batch-norm and cross-entropy kernels.

>>> import numpy as np
>>> from gpu.nn import mlp, SoftmaxCrossEntropy, Adam
>>> model, head = mlp([64, 100, 10]), SoftmaxCrossEntropy()
>>> opt = Adam(model.parameters().values(), lr=1e-3)
>>> x, y = np.random.rand(32, 64).astype(np.float32), np.arange(32) % 10
>>> loss = head.forward(model.forward(x), y); _ = model.backward(head.backward()); opt.step()
"""
from .checkpoint import load_model, save_model
from .data import Dataset, check_dataset, load_dataset, minibatches, synthetic, train_val_split
from .device import device_module, to_module
from .gradcheck import gradient_check
from .layers import (BatchNorm, Layer, Linear, Parameter, ReLU, Sequential, Sigmoid,
                     SoftmaxCrossEntropy, Standardize, Tanh, mlp)
from .optim import (SGD, Adam, Momentum, Optimizer, RMSprop, exponential_decay,
                    inverse_time_decay, make_optimizer)
from .trainer import History, check_batch_size, evaluate, fit

__all__ = [
    "Adam", "BatchNorm", "Dataset", "History", "Layer", "Linear", "Momentum", "Optimizer",
    "Parameter", "RMSprop", "ReLU", "SGD", "Sequential", "Sigmoid", "SoftmaxCrossEntropy",
    "Standardize", "Tanh", "check_batch_size", "check_dataset", "device_module", "evaluate",
    "exponential_decay", "fit", "gradient_check", "inverse_time_decay", "load_dataset",
    "load_model", "make_optimizer", "minibatches", "mlp", "save_model", "synthetic",
    "to_module", "train_val_split",
]
