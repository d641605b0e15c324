"""Data: the padded federated format, partitioners, synthetic tasks and loaders."""
