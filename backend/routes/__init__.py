"""The backend's route families, one Flask blueprint each (see ``backend/app.py``)."""
