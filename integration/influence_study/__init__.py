"""The linear datamodeling study of ``integration/influence.py``, by job.

* ``ensembles``: the recipe, the per-input loss and measurement, and many small models
  trained at once (the subset models);
* ``problems``: the data sets, their models and splits;
* ``lds``: the methods' scores, the subset models' measurements and the linear
  datamodeling score;
* ``report``: summaries over repeats, paired differences, the table and the figure.

Each module imports only modules above it in this list.
"""
