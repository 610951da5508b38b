"""The stand-in provider: an OpenAI-compatible server on loopback that answers with real LLMs'
recorded answers.

It is the one test double Frugal allows, standing in for providers these machines cannot reach. The
gateway drives it through litellm or plain HTTP exactly as it would drive OpenAI or vLLM.
"""
