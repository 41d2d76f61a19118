"""ptxray: pneumothorax segmentation and classification on chest X-rays, trained with Ray."""
__version__ = "0.1.0"
