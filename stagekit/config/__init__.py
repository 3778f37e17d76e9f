"""Configuration read from model directories and command lines."""
