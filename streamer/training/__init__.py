"""Training the shipped demo model: espeak-ng speech data (:mod:`.data`) and the recipe (:mod:`.train`).

Nothing here is imported by the daemon; these modules need espeak-ng (data) and, for the curve, matplotlib.
"""
