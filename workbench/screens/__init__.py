"""Full screens (one per mode of the app) and the modal dialogs they open."""
