"""Ground-truth suites: models with hand-planted mechanisms (known circuits, known features) and their runners."""
