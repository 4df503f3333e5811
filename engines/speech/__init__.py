"""Speech: Festival front end, log-mel features, vocoder, the offline corpus recipe."""
