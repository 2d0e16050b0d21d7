"""The errors the scripts report in one line (exit code 2) instead of a traceback."""
import zipfile


class InputError(ValueError):
    """Bad user input: the scripts report it in one line and exit with code 2."""


#: What reading an .npz of weights raises when the file is not one, or holds another architecture.
WEIGHTS_ERRORS = (KeyError, ValueError, OSError, zipfile.BadZipFile)


def weights_error(path, what, error):
    """The InputError for a weights file that could not be read as ``what`` (one of WEIGHTS_ERRORS)."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if 'pickled data' in reason:  # what np.load says of a file that is not an .npz (nor an .npy)
        reason = 'not an .npz file'
    return InputError('%s does not hold %s (%s)' % (path, what, reason))
