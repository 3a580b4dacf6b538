"""PLACEHOLDER: being written by another engineer; replace this whole file."""
def fit(*args, **kwargs):
    raise NotImplementedError('fit is not written yet')

def fit_to_data(*args, **kwargs):
    raise NotImplementedError('fit_to_data is not written yet')

def FitResult(*args, **kwargs):
    raise NotImplementedError('FitResult is not written yet')

def DataFitResult(*args, **kwargs):
    raise NotImplementedError('DataFitResult is not written yet')

