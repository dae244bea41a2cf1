"""Prediction: prompt embedding + datastore estimates -> quality and cost per backend (the
capability blend and the column-filling rule, ``predictor``), onboarding's fit of a new
backend's capability vector (``onboarding``), and the trained-router artifact format that
training writes and serving loads (``artifact``).

May import: the kernel, datastore, encoders.
"""
