"""ranker_service"""
