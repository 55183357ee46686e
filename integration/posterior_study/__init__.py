"""The posterior comparison of ``integration/posterior.py`` (its command line), by job.

* ``metrics``: the test metrics of a predictive (NLL, accuracy, ECE, Brier; Gaussian
  NLL, RMSE).
* ``predictive``: the linearised (``glm``) predictive from a posterior's public factors
  and per-layer Jacobian factors, and its check against laplace-torch's own.
* ``protocol``: the methods and their laplace-torch posteriors, the run configuration,
  the splits and rotated images, the MAP training, the prior-precision fits, one method
  on one seed, and the run over data sets, seeds and methods.
* ``report``: summaries over seeds, the paired K-FOC − K-FAC comparison, the markdown
  tables, and the output files.
* ``figures``: the figures.

Each module imports only modules above it in this list, except ``report``, which draws
the ``figures`` (``metrics`` ← ``predictive`` ← ``protocol`` ← ``figures`` ← ``report`` ←
``integration/posterior.py``). The protocol itself is documented in
``integration/posterior.py``'s docstring.
"""
