"""What an engineer runs locally: the `fedshop` command line, the federated simulation through
Flower's runtime, centralized and local-only training to compare against."""
