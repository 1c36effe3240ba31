"""Network decoupling (Li et al., CVPR 2020): per-layer architecture controllers trained with
Improved SemHash and a CE + mutual-information + KL + sparsity loss; the binary gates z of all
layers form an input's calculation path.

* :mod:`~jaxroute.decoupling.controller`: the controller module and ``semhash``;
* :mod:`~jaxroute.decoupling.losses`: ``mi``, ``kl``, ``sparse``;
* :mod:`~jaxroute.decoupling.model`: decoupled models (``gate_placement="decouple"``), loading;
* :mod:`~jaxroute.decoupling.train`: ``decouple_step`` and the resumable training loop;
* :mod:`~jaxroute.decoupling.flops`: per-sample MACs and the gathered B = 1 forward;
* the calculation paths as a router (``route --method controller``): :mod:`jaxroute.routing.controller`.

The submodules are imported explicitly (the models import the controller, so this
package imports nothing eagerly).
"""
