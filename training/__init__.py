"""medimg training: MedMNIST data, DenseNet-121, Ray Train loop, metrics, MLflow registry."""
