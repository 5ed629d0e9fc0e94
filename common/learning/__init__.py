"""The learning side: prepared data sets, the behaviour model, training and evaluation loops,
ranking metrics, baselines, demand forecasting and monitoring, inference on exported models."""
