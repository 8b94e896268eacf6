"""Publishing converted checkpoints on the Hugging Face Hub, and fetching them back.

``lic-push`` (:mod:`.cli`) sends a checked folder (:mod:`.bundle`) with a generated model card
(:mod:`.card`) in one commit (:mod:`.hub`); :func:`.hub.download_converted` is the way back.
"""
