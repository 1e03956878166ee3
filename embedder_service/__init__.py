"""embedder_service"""
