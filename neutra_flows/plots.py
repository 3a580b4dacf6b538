"""PLACEHOLDER: being written by another engineer; replace this whole file."""
def plot_draws(*args, **kwargs):
    raise NotImplementedError('plot_draws is not written yet')

