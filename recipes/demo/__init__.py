"""The recipe of the shipped demo model (``streamer/models/demo``): espeak-ng speech data (:mod:`.data`),
training (:mod:`.train`) and checkpoint averaging (:mod:`.average`).

Nothing here is imported by the daemon; the data needs espeak-ng and the training curve matplotlib.
"""
