"""The search: Optuna picks which convs to make dynamic, and how, under a compute budget."""

from dynify.search.space import SearchSpace, group_layers, load_space

__all__ = ["SearchSpace", "group_layers", "load_space"]
