package gpudispatch.nacos;

import com.alibaba.nacos.auth.common.AuthConfigs;
import io.jsonwebtoken.Jwts;
import io.jsonwebtoken.SignatureAlgorithm;
import io.jsonwebtoken.security.Keys;
import java.util.Date;
import javax.annotation.PostConstruct;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.stereotype.Component;

/**
 * Access tokens as Nacos issues them: a JWT signed with HS256 by the key
 * {@code nacos.core.auth.default.token.secret.key} (base64; Nacos falls back to the raw bytes when
 * it is not base64), whose subject is the user name and whose expiry is
 * {@code nacos.core.auth.default.token.expire.seconds} after issue.
 *
 * <p>With auth on, a key shorter than 32 bytes stops the server at start-up: HS256 needs 256 bits,
 * and a missing key would only surface at the first login.
 */
@Component
public class TokenManager {

    static final int MIN_KEY_BYTES = 32;

    @Autowired
    private AuthConfigs authConfigs;

    @PostConstruct
    public void checkKey() {
        if (authConfigs.isAuthEnabled() && authConfigs.getSecretKeyBytes().length < MIN_KEY_BYTES) {
            throw new IllegalStateException("nacos.core.auth.enabled=true needs nacos.core.auth.default.token.secret.key: "
                    + "a base64 key of at least " + MIN_KEY_BYTES + " bytes (e.g. `openssl rand -base64 32`)");
        }
    }

    /** A new token for {@code userName}, valid for the configured number of seconds. */
    public String createToken(String userName) {
        long now = System.currentTimeMillis();
        return Jwts.builder().setSubject(userName)
                .setExpiration(new Date(now + authConfigs.getTokenValidityInSeconds() * 1000L))
                .signWith(Keys.hmacShaKeyFor(authConfigs.getSecretKeyBytes()), SignatureAlgorithm.HS256).compact();
    }

    /**
     * The user name in {@code token}; throws {@link io.jsonwebtoken.ExpiredJwtException} when it has
     * expired and another {@link io.jsonwebtoken.JwtException} (or {@link IllegalArgumentException})
     * when it is not a token this key signed.
     */
    public String userOf(String token) {
        return Jwts.parserBuilder().setSigningKey(authConfigs.getSecretKeyBytes()).build().parseClaimsJws(token)
                .getBody().getSubject();
    }

    public long ttlSeconds() {
        return authConfigs.getTokenValidityInSeconds();
    }
}
