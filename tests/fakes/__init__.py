"""Small local stand-ins for the models and weights the tests would otherwise download."""
