"""The torch engine: the numeric kernels behind the ``torch`` backend and the probes, CPU or GPU.

One idea per module:

* :mod:`~sslbench.engine.device` — torch, imported when first used, and the device asked for;
* :mod:`~sslbench.engine.rows` — rows on the device and across the ranks of a process group, in chunks;
* :mod:`~sslbench.engine.gemm` — Gram products and the rounding of float32/bfloat16 products;
* :mod:`~sslbench.engine.nearest` — the exact nearest centre of every row by GEMM;
* :mod:`~sslbench.engine.bounds` — Yinyang bounds that skip rows whose nearest centre cannot change;
* :mod:`~sslbench.engine.seeding` — k-means++;
* :mod:`~sslbench.engine.kmeans` — mini-batch and Lloyd k-means (:class:`TorchKMeans`);
* :mod:`~sslbench.engine.pca` — exact PCA from a streamed covariance (:class:`TorchPCA`);
* :mod:`~sslbench.engine.options` — the options of both (:class:`TorchOptions`);
* :mod:`~sslbench.engine.lbfgs` — L-BFGS's direction and line search;
* :mod:`~sslbench.engine.logistic` — the linear probe's logistic regression and DINOv2's protocol;
* :mod:`~sslbench.engine.class_blocks` — its change of variables by per-class curvature blocks.

It is a core library rather than a plugin because several plugins share it (the ``torch`` backend
registers its PCA and k-means; a probe plugin reuses its GEMM, chunked-reading and thread helpers), and
one plugin importing another's module would tie them together outside the plugin contract. Modules
import torch only when called, so importing sslbench stays fast.
"""
