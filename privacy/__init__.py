"""Privacy accounting: budgets, noise planning and each client's cumulative spend."""
