"""surgenet_assist.core"""
