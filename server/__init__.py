import shared_models  # noqa: F401 - keeps MONAI from importing MLflow and TensorBoard (see there)
